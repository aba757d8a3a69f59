"""Property-based tests (hypothesis): the readers and every stage CLI driven with generated bad input.

Inputs: random bytes; truncated .gz, .zst and Parquet files; malformed WARC records; NUL bytes, lone surrogates
and lines of megabytes; JSON whose `text` (or id, or metadata) is a number, a list or null; ids repeated across
files. The invariant, for every example: either an InputError whose message names the file (and its line or
record, where the format has them), or one ledger row per input record with its reason. Never another exception,
never a hang (each example has a deadline), never a record unaccounted for.

`make test` runs a fixed, derandomized sample (FUZZ_EXAMPLES per test, default below); raise FUZZ_EXAMPLES and set
FUZZ_RANDOM=1 to search further.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipelines.document import Document, Rejected
from pipelines.readers import InputError, read_documents
from tests.conftest import prose

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=30_000,  # ms per example: a hang fails the test
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

# -- generated records ---------------------------------------------------------------------------------------------

IDS = st.sampled_from([f"doc{i}" for i in range(12)])  # a small pool: ids repeat within and across files
TEXT = st.one_of(
    st.builds(lambda s: prose(s, 30), st.integers(0, 10_000)),
    st.text(min_size=0, max_size=200),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=50).map(lambda t: f"{t}\x00{t}"),  # NUL bytes
    st.just(""),
    st.just(" \n\t "),
    st.builds(lambda s: f"{prose(s, 10)}\u2028{prose(s + 1, 10)}\x85end", st.integers(0, 99)),  # Unicode line breaks
)
WRONG = st.one_of(st.integers(), st.floats(allow_nan=True), st.lists(st.integers(), max_size=3), st.none(),
                  st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))  # fmt: skip


@st.composite
def jsonl_line(draw) -> bytes:
    """One line of a JSONL file (without its newline): a record, a broken record, or garbage."""
    kind = draw(st.sampled_from(["good", "good", "wrong_text", "wrong_id", "wrong_meta", "no_text", "surrogate",
                                 "garbage", "not_object", "truncated_json", "deep", "huge"]))  # fmt: skip
    record: dict = {"id": draw(IDS), "text": draw(TEXT)}
    if draw(st.integers(0, 3)):  # what scored_documents adds, which curriculum_shards reads: sometimes not a number
        record["quality_score"] = draw(st.one_of(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), WRONG))
    if kind == "wrong_text":
        record["text"] = draw(WRONG)
    elif kind == "wrong_id":
        record["id"] = draw(WRONG)
    elif kind == "wrong_meta":
        record["metadata"] = draw(st.one_of(WRONG, st.just("not json")))
    elif kind == "no_text":
        del record["text"]
    elif kind == "surrogate":  # JSON's \ud800 escape decodes to a lone surrogate, which UTF-8 cannot hold
        field = draw(st.sampled_from(["text", "id", "source", "extra"]))
        line = json.dumps({**record, field: "x"}).replace('"x"', '"a\\ud800b"', 1)
        return line.encode()
    elif kind == "garbage":
        return draw(st.binary(max_size=300)).replace(b"\n", b" ")
    elif kind == "not_object":
        return json.dumps(draw(st.one_of(WRONG, st.text(max_size=20)))).encode()
    elif kind == "truncated_json":
        line = json.dumps(record).encode()
        return line[: draw(st.integers(0, max(0, len(line) - 1)))]
    elif kind == "deep":
        depth = draw(st.integers(1_000, 50_000))
        return b'{"id": "deep", "text": "x", "m": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "huge":  # a line of megabytes: over the default max_chars of 1,000,000
        record["text"] = "word " * draw(st.integers(210_000, 600_000))
    return json.dumps(record).encode()


@dataclass
class Input:
    path: Path
    records: int | None
    """Records a reader must account for (documents + rejections); None when the file is not readable whole."""
    truncated: bool = False
    """Cut short where no reader can tell a shorter file: reading it must raise (a silently shorter corpus is loss)."""


def cut(draw, data: bytes) -> int:
    """A byte offset inside data, drawn as a fraction (so replays draw the same whatever the length)."""
    return min(len(data) - 1, int(draw(st.floats(0, 1, exclude_max=True)) * len(data)))


def compressed(payload: bytes, suffix: str) -> bytes:
    return gzip.compress(payload) if suffix == ".gz" else zstandard.ZstdCompressor().compress(payload)


@st.composite
def jsonl_file(draw, folder: Path) -> Input:
    lines = draw(st.lists(jsonl_line(), min_size=1, max_size=12))
    payload = b"\n".join(lines) + (b"\n" if lines and draw(st.booleans()) else b"")
    n_records = sum(1 for line in payload.split(b"\n") if line.strip())
    suffix = draw(st.sampled_from(["", "", ".gz", ".zst"]))
    damage = draw(st.sampled_from(["none", "none", "truncate", "random"]))
    data = compressed(payload, suffix) if suffix else payload
    if damage == "truncate" and suffix and len(data) > 1:
        data = data[: cut(draw, data)]
    elif damage == "random":
        data = draw(st.binary(min_size=1, max_size=400))
    path = folder / f"{uuid.uuid4().hex[:8]}.jsonl{suffix}"
    path.write_bytes(data)
    truncated = damage == "truncate" and bool(suffix) and len(data) > 0
    return Input(path, n_records if damage == "none" else None, truncated)


@st.composite
def parquet_file(draw, folder: Path) -> Input:
    n = draw(st.integers(0, 8))
    text_type = draw(st.sampled_from(["string", "string", "int", "list", "null"]))
    texts = {
        "string": [draw(TEXT) for _ in range(n)],
        "int": list(range(n)),
        "list": [[i] for i in range(n)],
        "null": [None] * n,
    }[text_type]
    columns = {"id": [draw(IDS) for _ in range(n)], "text": texts}
    if draw(st.booleans()):
        columns["quality_score"] = [draw(st.one_of(st.floats(0, 1), st.none())) for _ in range(n)]
    table = pa.table(columns)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "random"]))
    if damage == "truncate":
        data = data[: cut(draw, data)]
    elif damage == "random":
        data = draw(st.binary(max_size=400))
    path = folder / f"{uuid.uuid4().hex[:8]}.parquet"
    path.write_bytes(data)
    return Input(path, n if damage == "none" else None, damage == "truncate")


@st.composite
def warc_file(draw, folder: Path) -> Input:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    gz = draw(st.booleans())
    sink = io.BytesIO()
    writer = WARCWriter(sink, gzip=gz)
    n = draw(st.integers(0, 5))
    for i in range(n):
        ctype = draw(st.sampled_from(["text/html; charset=utf-8", "text/plain", "image/png", ""]))
        body = draw(st.one_of(st.builds(lambda s: f"<html><body><p>{prose(s, 20)}</p></body></html>".encode(),
                                        st.integers(0, 999)), st.binary(max_size=200)))  # fmt: skip
        headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)] if ctype else [], protocol="HTTP/1.0")
        fixed = {"WARC-Record-ID": f"<urn:uuid:00000000-0000-0000-0000-{i:012d}>", "WARC-Date": "2026-01-01T00:00:00Z"}
        record = writer.create_warc_record(f"http://x.test/{i}", "response", payload=io.BytesIO(body),
                                           http_headers=headers, warc_headers_dict=fixed)  # fmt: skip
        writer.write_record(record)
    data = sink.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "header"]))
    if damage == "truncate" and data:
        data = data[: cut(draw, data)]
    elif damage == "flip" and data:
        at = cut(draw, data)
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    elif damage == "header":
        data = b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: " + draw(st.sampled_from([b"abc", b"99999", b"-1"]))
        data += b"\r\n\r\nshort body"
    path = folder / f"{uuid.uuid4().hex[:8]}.warc{'.gz' if gz else ''}"
    path.write_bytes(data)
    return Input(path, n if damage == "none" else None)


# -- the invariant -------------------------------------------------------------------------------------------------


def assert_names_an_input(message: str, inputs: list[Input]) -> None:
    """A refusal names the file it is about. One that starts with the file is about a place in it, and says the line
    (compressed JSONL) or the record (WARC); a stage's refusal of a whole input (nothing left to score) may name
    the file anywhere in its sentence."""
    path = next((i.path for i in inputs if str(i.path) in message), None)
    assert path is not None, f"the error does not name an input: {message!r}"
    if not message.startswith(str(path)):
        return
    rest = message[len(str(path)) :]
    if path.name.endswith((".gz", ".zst")) and ".warc" not in path.name:
        assert rest.split(":")[1].strip().isdigit(), f"no line number in {message!r}"
    if ".warc" in path.name:
        assert rest.startswith(":record "), f"no record number in {message!r}"


def check_reading(inputs: list[Input]) -> None:
    try:
        records = list(read_documents([str(i.path) for i in inputs]))
    except InputError as e:
        event("InputError")
        assert_names_an_input(str(e), inputs)
        return
    event("read")
    assert not any(i.truncated for i in inputs), "a truncated file was read as a shorter one, without an error"
    assert all(isinstance(r, Document | Rejected) for r in records)
    docs = [r for r in records if isinstance(r, Document)]
    assert len({d.id for d in docs}) == len(docs)  # ids unique across files: repeats are rejections
    for d in docs:  # whatever a reader passes on, every stage can write
        for value in (d.id, d.text, d.source, json.dumps(d.metadata, ensure_ascii=False)):
            value.encode("utf-8")
    for r in records:
        assert r.location, r
    if all(i.records is not None for i in inputs):
        assert len(records) == sum(i.records for i in inputs), "a record went unaccounted for"


def files(strategy):
    return st.lists(strategy, min_size=1, max_size=3)


FORMATS = {"jsonl": jsonl_file, "parquet": parquet_file, "warc": warc_file}


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(data=st.data())
def test_each_reader_accounts_for_every_record_or_names_the_file(fmt, tmp_path, data):
    folder = tmp_path / uuid.uuid4().hex[:8]
    folder.mkdir()
    check_reading(data.draw(files(FORMATS[fmt](folder))))


# -- every stage CLI -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quality_model(tmp_path_factory) -> Path:
    from pipelines.quality import QualityModelConfig, train_quality_classifier
    from tests.conftest import write_jsonl

    d = tmp_path_factory.mktemp("fuzz_quality")
    pos = write_jsonl(d / "pos.jsonl", [{"id": f"p{i}", "text": prose(i, 60)} for i in range(40)])
    raw = write_jsonl(d / "raw.jsonl", [{"id": f"r{i}", "text": f"BUY NOW {i} cheap " * 9} for i in range(40)])
    config = QualityModelConfig(epoch=5, min_examples_per_class=20, threads=1)
    train_quality_classifier([str(raw)], d / "model", [str(pos)], config, log=None)
    return d / "model" / "model.bin"


def stage_commands(quality_model: Path) -> dict[str, tuple]:
    """Each stage CLI, its extra arguments, and whether it takes a folder (datatrove's) rather than files."""
    from pipelines import clean, curriculum, filters, ingest, near_dedup, near_dedup_datatrove, quality_score

    return {
        "raw_documents": (ingest.main, [], False),
        "clean_documents": (clean.main, ["--workers", "1"], False),
        "near_dedup_documents": (near_dedup.main, ["--workers", "1"], False),
        "near_dedup_datatrove": (near_dedup_datatrove.main, ["--workers", "1", "--tasks", "1"], True),
        "filtered_documents": (filters.main, ["--workers", "1"], False),
        "scored_documents": (quality_score.main, ["--workers", "1", "--model", str(quality_model)], False),
        "curriculum_shards": (curriculum.main, [], False),
    }


STAGES = ["raw_documents", "clean_documents", "near_dedup_documents", "filtered_documents", "scored_documents",
          "curriculum_shards"]  # fmt: skip


@pytest.mark.parametrize("stage", STAGES)
@settings(FUZZ, max_examples=max(5, EXAMPLES // 3))
@given(data=st.data())
def test_every_stage_cli_ledgers_every_record_or_names_the_file(stage, quality_model, tmp_path, data):
    check_stage_cli(stage, quality_model, tmp_path, data)


@settings(FUZZ, max_examples=8)  # each example starts datatrove's executors: seconds, not milliseconds
@given(data=st.data())
def test_the_datatrove_near_dedup_cli_ledgers_every_record_or_names_the_file(quality_model, tmp_path, data):
    check_stage_cli("near_dedup_datatrove", quality_model, tmp_path, data)


@settings(FUZZ, max_examples=12)  # each example trains a fastText model
@given(data=st.data())
def test_the_quality_classifier_cli_trains_or_names_the_file(tmp_path, data):
    """pipelines.quality (the quality_classifier asset's CLI) on generated raw corpora, against an embedded-style
    reference set; it writes a model, not a ledger: either the model and its metrics, or an error naming a file."""
    from pipelines import quality
    from tests.conftest import write_jsonl

    folder = tmp_path / uuid.uuid4().hex[:8]
    folder.mkdir()
    positives = write_jsonl(folder / "reference.jsonl", [{"id": f"p{i}", "text": prose(i, 60)} for i in range(150)])
    # enough valid raw documents beside the generated files that the classifier can train, whatever they hold
    junk = [{"id": f"r{i}", "text": f"BUY NOW {i} cheap " * 9} for i in range(150)]
    padding = write_jsonl(folder / "padding.jsonl", junk)
    inputs = data.draw(files(st.one_of(jsonl_file(folder), parquet_file(folder))))
    out = folder / "out"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rc = quality.main(["--negatives", str(padding), *(str(i.path) for i in inputs), "--positives", str(positives),
                           "--output", str(out)])  # fmt: skip
    assert rc in (0, 2)
    event("refused" if rc == 2 else "trained")
    if rc == 2:
        message = err.getvalue().strip().splitlines()[-1]
        assert message.startswith("error: "), message
        if "too few examples" not in message:  # too little text in all inputs together: counts, not a file
            assert_names_an_input(message.removeprefix("error: "), inputs)
        return
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "model.bin").stat().st_size > 0 and 0 <= metrics["roc_auc"] <= 1


def check_stage_cli(stage: str, quality_model: Path, tmp_path: Path, data) -> None:
    main, extra, takes_folder = stage_commands(quality_model)[stage]
    folder = tmp_path / uuid.uuid4().hex[:8] / "in"
    folder.mkdir(parents=True)
    inputs = data.draw(files(st.one_of(jsonl_file(folder), parquet_file(folder))))
    if takes_folder:  # exactly the drawn files (a draw hypothesis discarded may have left its file behind)
        folder = folder.parent / "only"
        folder.mkdir()
        for i in inputs:
            i.path = i.path.rename(folder / i.path.name)
    out = folder.parent / "out"
    args = [str(folder)] if takes_folder else [str(i.path) for i in inputs]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(["--input", *args, "--output", str(out), *extra])
    assert rc in (0, 2)
    event("refused" if rc == 2 else "ledgered")
    if rc == 2:  # refused: the message names the file
        message = err.getvalue().strip().splitlines()[-1]
        event("why: " + re.sub(r"/\S+", "PATH", message)[:90])
        assert message.startswith("error: "), message
        assert_names_an_input(message.removeprefix("error: "), inputs)
        return
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert {r["outcome"] for r in ledger} <= {"kept", "dropped"}
    assert all(r["reason"] for r in ledger if r["outcome"] == "dropped")
    assert len({r["id"] for r in ledger}) == len(ledger)  # one row per record
    if all(i.records is not None for i in inputs):
        assert len(ledger) == sum(i.records for i in inputs), "a record is missing from the ledger"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n_in"] == stats["n_kept"] + stats["n_dropped"] == len(ledger)
