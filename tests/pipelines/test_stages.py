"""ingest -> clean -> near_dedup on small corpora: outputs, ledgers, determinism, the CLIs."""

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.clean import CleanConfig, clean
from pipelines.document import kept_by_source
from pipelines.ingest import ingest
from pipelines.near_dedup import NearDedupConfig, near_dedup
from pipelines.readers import InputError, ReaderConfig
from pipelines.text import normalize_text
from tests.conftest import prose, run_with_tmpfs, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def ledger_rows(out_dir: Path) -> list[dict]:
    return pq.read_table(out_dir / "ledger.parquet").to_pylist()


def test_normalize_text_repairs_and_tidies():
    assert normalize_text("Caf\u00c3\u00a9  au\tlait \r\n\n\n\nnext\x07 line\u200b ") == "Café au lait\n\nnext line"
    nfd = unicodedata.normalize("NFD", "résumé")
    assert normalize_text(nfd) == unicodedata.normalize("NFC", "résumé")


def test_ingest_ledgers_every_record(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "text": "alpha"},
            "{oops",
            {"id": "b", "text": ""},
            {"id": "a", "text": "dup"},
            {"id": "c", "text": "x" * 50},
        ],
    )
    stats = ingest([str(src)], tmp_path / "raw", ReaderConfig(max_chars=20))
    assert (stats.n_in, stats.n_kept, stats.n_dropped) == (5, 1, 4)
    assert stats.drop_reasons == {"empty": 1, "malformed": 2, "oversize": 1}
    assert pq.read_table(tmp_path / "raw" / "documents.parquet")["id"].to_pylist() == ["a"]
    assert [r["outcome"] for r in ledger_rows(tmp_path / "raw")] == ["kept", "dropped", "dropped", "dropped", "dropped"]


def test_ingest_fails_on_missing_input_without_partial_output(tmp_path):
    with pytest.raises(InputError, match=r"nope\.jsonl"):
        ingest([str(tmp_path / "nope.jsonl")], tmp_path / "raw")
    assert not (tmp_path / "raw" / "documents.parquet").exists()
    assert not list((tmp_path / "raw").glob("*.tmp")) if (tmp_path / "raw").exists() else True


def test_clean_drops_exact_duplicates_after_normalisation(tmp_path):
    base = "Caf\u00e9 menu.  Soup of the day"
    rows = [
        {"id": "1", "text": base},
        {"id": "2", "text": unicodedata.normalize("NFD", base) + "  \r\n"},  # same after NFC + whitespace
        {"id": "3", "text": base.encode("utf-8").decode("cp1252")},  # mojibake, repaired by ftfy
        {"id": "4", "text": "\x00\x07\u200b"},  # nothing left
        {"id": "5", "text": "different text"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    stats = clean([str(src)], tmp_path / "clean", CleanConfig(workers=1))
    assert stats.drop_reasons == {"empty": 1, "exact_duplicate": 2}
    kept = pq.read_table(tmp_path / "clean" / "documents.parquet").to_pylist()
    assert [(d["id"], d["text"]) for d in kept] == [("1", "Café menu. Soup of the day"), ("5", "different text")]
    dropped = {r["id"]: r["detail"] for r in ledger_rows(tmp_path / "clean") if r["outcome"] == "dropped"}
    assert dropped["2"] == dropped["3"] == "same clean text as 1"


def corpus_with_near_duplicates(tmp_path: Path) -> Path:
    rows = []
    for i in range(40):
        text = prose(i, 150)
        rows.append({"id": f"base{i}", "text": text})
        if i < 10:  # a footer: Jaccard ~0.97 with the base
            rows.append({"id": f"near{i}", "text": text + " share this page with your friends today"})
        if i < 5:  # a second near-duplicate of the same base, slightly longer
            rows.append(
                {"id": f"near{i}b", "text": "posted on monday morning by the editors " + text + " share this page now"}
            )
    return write_jsonl(tmp_path / "docs.jsonl", rows)


def test_near_dedup_clusters_and_keeps_longest(tmp_path):
    src = corpus_with_near_duplicates(tmp_path)
    stats = near_dedup([str(src)], tmp_path / "nd", NearDedupConfig(workers=1))
    assert (stats.n_in, stats.n_kept, stats.n_dropped) == (55, 40, 15)
    clusters = {r["id"]: r for r in pq.read_table(tmp_path / "nd" / "clusters.parquet").to_pylist()}
    for i in range(5):
        group = [clusters[f"base{i}"], clusters[f"near{i}"], clusters[f"near{i}b"]]
        assert len({c["cluster_id"] for c in group}) == 1 and group[0]["cluster_size"] == 3
        assert [c["kept"] for c in group] == [False, False, True]  # near{i}b is the longest
    assert all(clusters[f"base{i}"]["cluster_size"] == 1 for i in range(10, 40))
    kept_ids = pq.read_table(tmp_path / "nd" / "documents.parquet")["id"].to_pylist()
    assert len(kept_ids) == 40 and "near3b" in kept_ids and "base3" not in kept_ids
    reasons = {r["id"]: (r["reason"], r["detail"]) for r in ledger_rows(tmp_path / "nd") if r["outcome"] == "dropped"}
    assert reasons["base3"] == (f"near_duplicate:{clusters['base3']['cluster_id']}", "cluster of 3, kept near3b")


def test_near_dedup_is_deterministic_across_worker_counts(tmp_path):
    src = corpus_with_near_duplicates(tmp_path)
    near_dedup([str(src)], tmp_path / "one", NearDedupConfig(workers=1))
    near_dedup([str(src)], tmp_path / "two", NearDedupConfig(workers=2, batch_docs=8, inline_below=0))
    for name in ("documents.parquet", "clusters.parquet", "ledger.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_near_dedup_rejects_inconsistent_lsh_settings(tmp_path):
    src = corpus_with_near_duplicates(tmp_path)
    with pytest.raises(ValueError, match="bands x rows"):
        near_dedup([str(src)], tmp_path / "nd", NearDedupConfig(bands=20, rows=10))
    with pytest.raises(ValueError, match="both"):
        near_dedup([str(src)], tmp_path / "nd", NearDedupConfig(bands=20))


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_near_dedup_cli_contract(tmp_path):
    src = corpus_with_near_duplicates(tmp_path)
    with open(src, "a") as f:
        f.write("not json\n")
    out = tmp_path / "out"
    result = run_cli("pipelines.near_dedup", "--input", str(src), "--output", str(out), "--threshold", "0.8")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["n_in"] == 56 and stats["drop_reasons"] == {"malformed": 1, "near_duplicate": 15}
    assert pq.read_table(out / "documents.parquet").num_rows == 40
    clusters = pq.read_table(out / "clusters.parquet")
    assert clusters.column_names[:2] == ["id", "cluster_id"] and clusters.num_rows == 55


def test_stage_cli_reports_bad_input_with_exit_2(tmp_path):
    result = run_cli("pipelines.clean", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "missing.jsonl" in result.stderr and "no such file" in result.stderr


def test_chained_stages_balance(tmp_path):
    src = corpus_with_near_duplicates(tmp_path)
    with open(src, "a") as f:
        f.write('{"id": "base0", "text": "duplicate id"}\n{"id": "copy", "text": "' + prose(7, 150) + '"}\n')
    raw = ingest([str(src)], tmp_path / "raw")
    cln = clean([str(tmp_path / "raw" / "documents.parquet")], tmp_path / "clean", CleanConfig(workers=1))
    nd = near_dedup([str(tmp_path / "clean" / "documents.parquet")], tmp_path / "nd", NearDedupConfig(workers=1))
    assert raw.n_kept == cln.n_in and cln.n_kept == nd.n_in
    assert raw.n_in == 57 == nd.n_kept + raw.n_dropped + cln.n_dropped + nd.n_dropped
    assert cln.drop_reasons == {"exact_duplicate": 1}


FAULT_SCRIPT = """
set -u
out="$DISK/raw"
$PY -m pipelines.ingest --input "$SMALL" --output "$out" > /dev/null 2>&1 || exit 10
sha256sum "$out"/* > "$REPORT/before"
{fault}
$PY -m pipelines.ingest --input "$NEXT" --output "$out" > /dev/null 2> "$REPORT/stderr"
echo $? > "$REPORT/rc"
sha256sum "$out"/* > "$REPORT/after"
ls -A "$out" > "$REPORT/listing"
"""


@pytest.mark.parametrize(
    ("fault", "next_input", "message"),
    [
        ("", "big", "No space left on device"),  # the disk fills while documents.parquet is written
        ('mount -o remount,ro "$DISK"', "small", "cannot write: Read-only file system"),
    ],
    ids=["full_disk", "read_only_folder"],
)
def test_a_full_disk_or_read_only_folder_names_the_path_and_keeps_the_previous_output(
    tmp_path, fault, next_input, message
):
    """A stage CLI on a 1 MiB tmpfs: a first run writes its output; a second one that fills the disk (or finds
    the folder read-only) exits 1 with an error naming the file, and every file of the first run is as it was."""
    small = write_jsonl(tmp_path / "small.jsonl", [{"id": f"s{i}", "text": prose(i, 60)} for i in range(20)])
    big = write_jsonl(tmp_path / "big.jsonl", [{"id": f"b{i}", "text": prose(i, 600)} for i in range(1500)])
    report = tmp_path / "report"
    report.mkdir()
    disk = tmp_path / "disk"
    env = f"DISK='{disk}' SMALL='{small}' NEXT='{big if next_input == 'big' else small}' REPORT='{report}'"
    proc = run_with_tmpfs(disk, "1m", f"export {env}\n" + FAULT_SCRIPT.format(fault=fault))
    assert proc.returncode == 0, proc.stderr
    assert (report / "rc").read_text().strip() == "1"
    error = (report / "stderr").read_text().strip().splitlines()[-1]
    assert error.startswith(f"error: {disk}/raw/documents.parquet: cannot write: ") and error.endswith(message), error
    assert (report / "after").read_text() == (report / "before").read_text()  # the first run's files, intact
    assert sorted((report / "listing").read_text().split()) == ["documents.parquet", "ledger.parquet", "stats.json"]


def test_kept_by_source_follows_each_source_through_the_stages():
    def ledger(rows):  # (id, outcome, location)
        ids, outcomes, locations = zip(*rows)
        return pa.table({"id": list(ids), "outcome": list(outcomes), "location": list(locations)})

    raw = ledger([("a1", "kept", "a.jsonl:1"), ("a2", "kept", "a.jsonl:2"), ("b1", "kept", "b.warc:1"),
                  ("bad", "dropped", "b.warc:2"), ("c1", "kept", "c.jsonl:1")])  # fmt: skip
    clean = ledger([("a1", "kept", ""), ("a2", "dropped", ""), ("b1", "kept", ""), ("c1", "kept", "")])
    final = ledger([("a1", "kept", ""), ("b1", "dropped", ""), ("c1", "kept", "")])
    sources = {"a1": "docs", "a2": "docs", "b1": "book", "c1": "notes"}  # "bad" never got one
    rows = kept_by_source({"raw": raw, "clean": clean, "final": final}, sources)
    assert rows == [
        {"source": "docs", "input": 2, "raw": 2, "clean": 1, "final": 1},  # largest first, then by name
        {"source": "b.warc", "input": 1, "raw": 0, "clean": 0, "final": 0},  # dropped on reading: its file
        {"source": "book", "input": 1, "raw": 1, "clean": 1, "final": 0},
        {"source": "notes", "input": 1, "raw": 1, "clean": 1, "final": 1},
    ]
    folded = kept_by_source({"raw": raw, "clean": clean, "final": final}, sources, max_sources=1)
    assert [(r["source"], r["input"], r["final"]) for r in folded] == [("docs", 2, 1), ("(other)", 3, 1)]
