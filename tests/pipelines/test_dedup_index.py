"""Incremental exact and near-dedup against the persisted index: drops A then B give what A ∪ B gives at once."""

import json
import random

import pyarrow.parquet as pq
import pytest

from pipelines.clean import CleanConfig, clean
from pipelines.dedup_index import INDEX_DIR, MANIFEST_FILE, PARTITIONS_DIR, DedupIndexError
from pipelines.dedup_rebuild import main, rebuild
from pipelines.near_dedup import NearDedupConfig, near_dedup
from tests.conftest import prose, write_jsonl


def near_copy(text: str, seed: int) -> str:
    """The text with a few words changed: Jaccard of its 5-grams with the original stays above 0.8."""
    words = text.split()
    rng = random.Random(seed)
    for i in rng.sample(range(len(words)), 2):
        words[i] = "zz" + words[i]
    return " ".join(words)


def drops(tmp_path):
    """Drop A: 30 documents with 5 near-duplicate pairs. Drop B: 20 documents, of which 6 near-copy A's, 2 are
    exact copies of A's, 1 bridges two of A's clusters, and 3 near-duplicate each other."""
    base = {i: prose(i, 160) for i in range(60)}
    a = [{"id": f"a{i}", "text": base[i]} for i in range(25)]
    a += [{"id": f"a{i}n", "text": near_copy(base[i], i)} for i in range(5)]
    # two A documents, a shared text plus 30 words of their own: their Jaccard (~0.74) is below the threshold, but
    # the shared text on its own (~0.85 with each) bridges them
    a += [{"id": "left", "text": base[40] + " " + prose(41, 25)},
          {"id": "right", "text": base[40] + " " + prose(42, 25)}]  # fmt: skip
    b = [{"id": f"b{i}", "text": near_copy(base[i], 100 + i) + " more"} for i in range(5, 11)]
    b += [{"id": "b_exact0", "text": base[20]}, {"id": "b_exact1", "text": base[21]}]
    b += [{"id": f"b_new{i}", "text": base[30 + i]} for i in range(9)]
    b += [{"id": f"b_pair{i}", "text": f"{base[50]} the end {i}"} for i in range(3)]
    b += [{"id": "bridge", "text": base[40]}]
    return write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)


def run_incremental(tmp_path, srcs, name="inc"):
    """clean then near-dedup, drop by drop, each against the indexes of the drops before it."""
    root = tmp_path / name
    outs = []
    for key, src in srcs:
        clean_dir = root / "clean_documents" / PARTITIONS_DIR / key
        clean([str(src)], clean_dir, CleanConfig(workers=1), log=None, index_dir=root / "clean_documents" / INDEX_DIR,
              partition=key)  # fmt: skip
        nd_dir = root / "near_dedup_documents" / PARTITIONS_DIR / key
        near_dedup([str(clean_dir / "documents.parquet")], nd_dir, NearDedupConfig(workers=1), log=None,
                   index_dir=root / "near_dedup_documents" / INDEX_DIR, partition=key)  # fmt: skip
        outs.append(nd_dir)
    return root, outs


def table(path, name):
    return pq.read_table(path / name).to_pylist()


def test_drops_a_then_b_equal_a_union_b_up_to_the_kept_rule(tmp_path):
    a, b = drops(tmp_path)
    root, (out_a, out_b) = run_incremental(tmp_path, [("A", a), ("B", b)])
    clean([str(a), str(b)], tmp_path / "once_clean", CleanConfig(workers=1), log=None)
    near_dedup([str(tmp_path / "once_clean" / "documents.parquet")], tmp_path / "once", NearDedupConfig(workers=1),
               log=None)  # fmt: skip

    # Exact dedup: the same documents dropped, pointing at the same kept copy, named with its drop.
    once_clean = {r["id"]: r for r in table(tmp_path / "once_clean", "ledger.parquet")}
    inc_clean = {r["id"]: r for d in ("A", "B") for r in table(root / "clean_documents" / PARTITIONS_DIR / d,
                                                                   "ledger.parquet")}  # fmt: skip
    assert {i: r["outcome"] for i, r in once_clean.items()} == {i: r["outcome"] for i, r in inc_clean.items()}
    assert inc_clean["b_exact0"]["duplicate_of"] == "a20" and inc_clean["b_exact0"]["duplicate_partition"] == "A"
    assert inc_clean["b_exact0"]["partition"] == "B"

    # Near-dedup: the same clusters (cluster ids are global positions in drop order, so they compare directly) ...
    once = {r["id"]: r for r in table(tmp_path / "once", "clusters.parquet")}
    inc = {r["id"]: r for out in (out_a, out_b) for r in table(out, "clusters.parquet")}
    assert set(once) == set(inc)
    bridged = {once["left"]["cluster_id"]}
    for i in once:
        if once[i]["cluster_id"] not in bridged:
            assert inc[i]["cluster_id"] == once[i]["cluster_id"], i
    # ... each with one kept member, except the two A clusters that B's bridge joined: A published both.
    kept = {}
    for i, r in inc.items():
        kept.setdefault(once[i]["cluster_id"], []).append(r["kept"])
    assert all(sum(k) == (2 if c in bridged else 1) for c, k in kept.items())
    # Which member is kept: a cluster with A members keeps A's; a cluster of B only keeps its longest, as at once.
    for i in range(5, 11):
        assert not inc[f"b{i}"]["kept"] and once[f"b{i}"]["kept"]  # the longer B copy wins at once, not after A
    pair = [inc[f"b_pair{i}"]["kept"] for i in range(3)]
    assert pair == [once[f"b_pair{i}"]["kept"] for i in range(3)] and sum(pair) == 1
    ledger = {r["id"]: r for r in table(out_b, "ledger.parquet")}
    assert (ledger["b5"]["duplicate_of"], ledger["b5"]["duplicate_partition"]) == ("a5", "A")
    assert ledger["b5"]["detail"].endswith("kept a5 in drop A")
    stats_b = json.loads((out_b / "stats.json").read_text())
    assert stats_b["extra"]["index"]["first_position"] == 32 and stats_b["extra"]["n_merged_clusters"] == 1


def test_rerunning_a_drop_gives_the_same_bytes_and_a_changed_earlier_drop_is_refused(tmp_path):
    a, b = drops(tmp_path)
    root, (out_a, out_b) = run_incremental(tmp_path, [("A", a), ("B", b)])
    before = {p.name: p.read_bytes() for p in (out_a / "clusters.parquet", out_b / "clusters.parquet")}
    manifest = (root / "near_dedup_documents" / INDEX_DIR / MANIFEST_FILE).read_text()
    run_incremental(tmp_path, [("A", a), ("B", b)])
    assert before == {p.name: p.read_bytes() for p in (out_a / "clusters.parquet", out_b / "clusters.parquet")}
    assert manifest == (root / "near_dedup_documents" / INDEX_DIR / MANIFEST_FILE).read_text()
    changed = write_jsonl(tmp_path / "a2.jsonl", [{"id": "other", "text": prose(999)}])
    with pytest.raises(DedupIndexError, match=r"drop .A. now holds other documents.*B"):
        run_incremental(tmp_path, [("A", changed)])


def test_a_corrupt_or_mismatched_index_is_refused_naming_the_file_and_rebuilt_by_one_command(tmp_path, capsys):
    a, b = drops(tmp_path)
    root, (_, out_b) = run_incremental(tmp_path, [("A", a), ("B", b)])
    index = root / "near_dedup_documents" / INDEX_DIR
    good = {p.name: p.read_bytes() for p in sorted(index.iterdir())}
    outputs = (out_b / "clusters.parquet").read_bytes()
    (index / "0000.parquet").write_bytes(b"not parquet")
    with pytest.raises(DedupIndexError, match=r"0000\.parquet: corrupt.*rebuild"):
        run_incremental(tmp_path, [("C", b)])
    with pytest.raises(DedupIndexError, match=r"index\.json: made with other parameters \(bands, num_perm, rows"):
        near_dedup([str(b)], tmp_path / "x", NearDedupConfig(workers=1, num_perm=64), log=None, index_dir=index,
                   partition="C")  # fmt: skip
    (index / MANIFEST_FILE).write_text('{"format": "frugal-dedup-index", "version": 0')
    with pytest.raises(DedupIndexError, match=r"index\.json: unreadable"):
        run_incremental(tmp_path, [("C", b)])

    assert main([str(root / "near_dedup_documents")]) == 0
    assert "from 2 drops: A, B" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in sorted(index.iterdir())} == good
    assert (out_b / "clusters.parquet").read_bytes() == outputs
    # clean_documents indexed drop C before near-dedup refused its corrupt index
    assert rebuild(root / "clean_documents", log=lambda m: None) == ["A", "B", "C"]
