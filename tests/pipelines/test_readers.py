import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipelines.document import Document, Rejected
from pipelines.readers import InputError, ReaderConfig, expand_inputs, read_documents
from tests.conftest import write_jsonl

ROWS = [{"id": "a", "text": "alpha text"}, {"id": "b", "text": "beta text", "source": "web", "metadata": {"k": 1}}]


def read_all(paths, **config):
    return list(read_documents([str(p) for p in paths], ReaderConfig(**config)))


def test_jsonl_plain_gzip_and_zstd_read_the_same(tmp_path):
    plain = write_jsonl(tmp_path / "c.jsonl", ROWS)
    payload = plain.read_bytes()
    (tmp_path / "c2.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "c3.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    for name in ("c.jsonl", "c2.jsonl.gz", "c3.jsonl.zst"):
        docs = read_all([tmp_path / name])
        assert [(d.id, d.text, d.metadata) for d in docs] == [("a", "alpha text", {}), ("b", "beta text", {"k": 1})]
    assert read_all([tmp_path / "c.jsonl"])[0].source == "c"  # default source: the file's stem
    assert read_all([tmp_path / "c.jsonl"])[1].source == "web"


def test_parquet_and_missing_ids(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": "no id here"}, {"text": "nor here"}]), tmp_path / "p.parquet")
    docs = read_all([tmp_path / "p.parquet"])
    assert [d.id for d in docs] == ["p/1", "p/2"]
    assert docs[1].location.endswith("p.parquet:row 2")


def test_warc_html_and_text_records(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.gz"
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        html = (  # an mdBook page's chrome: its keyboard-help box, sidebar and menu bar
            b'<html><body><div id="mdbook-help-container"><h2>Keyboard shortcuts</h2><p>Press \xe2\x86\x90 or '
            b'\xe2\x86\x92 to navigate between chapters</p></div><nav id="sidebar">Chapter 1 Chapter 2</nav>'
            b'<div id="menu-bar">Search this book</div><main><p>Hello from the page body.</p></main></body></html>'
        )
        for uri, ctype, body in [
            ("http://x.test/a", "text/html; charset=utf-8", html),
            ("http://x.test/b", "image/png", b"\x89PNG"),
        ]:
            headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.0")
            writer.write_record(
                writer.create_warc_record(uri, "response", payload=io.BytesIO(body), http_headers=headers)
            )
    records = read_all([path])
    assert isinstance(records[0], Document) and records[0].text.strip() == "Hello from the page body."
    assert records[0].metadata["url"] == "http://x.test/a"
    assert isinstance(records[1], Rejected) and "image/png" in records[1].detail


def test_each_bad_record_becomes_a_rejection_with_its_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"id": "ok", "text": "fine"},
            '{"id": "broken", "text": ',  # 2: malformed JSON
            b'{"id": "u", "text": "\xff"}',  # 3: invalid UTF-8
            {"id": "m"},  # 4: text missing
            {"id": "n", "text": 7},  # 5: text not a string
            {"id": "e", "text": " \n\t "},  # 6: whitespace only
            {"id": "ok", "text": "again"},  # 7: duplicate id
            {"id": "big", "text": "x" * 101},  # 8: oversize
            "[1, 2]",  # 9: not an object
            {"id": "meta", "text": "t", "metadata": [1]},  # 10: metadata not an object
        ],
    )
    records = read_all([path], max_chars=100)
    assert isinstance(records[0], Document)
    got = [(r.reason, r.location.rsplit(":", 1)[1]) for r in records[1:]]
    assert got == [
        ("malformed", "2"),
        ("malformed", "3"),
        ("malformed", "4"),
        ("malformed", "5"),
        ("empty", "6"),
        ("malformed", "7"),
        ("oversize", "8"),
        ("malformed", "9"),
        ("malformed", "10"),
    ]
    details = [r.detail for r in records[1:]]
    assert "invalid JSON" in details[0] and "UTF-8" in details[1] and "missing" in details[2]
    assert "duplicate id 'ok'" in details[5] and f"{path}:1" in details[5]
    ledger_ids = [r.ledger_id for r in records[1:]]
    assert len(set(ledger_ids)) == len(ledger_ids) and "ok" not in ledger_ids


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "no such file"),
        ("notes.txt", b"hello", "unknown input format"),
        (
            "corrupt.jsonl.gz",
            # mtime 0: the same bytes, and so the same test id, in every process (xdist workers compare ids)
            gzip.compress(json.dumps({"id": "a", "text": "t"}).encode() * 50, mtime=0)[:-30],
            "corrupt.jsonl.gz:",
        ),
    ],
)
def test_fatal_input_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        read_all([path])
    assert name in str(err.value)


def test_globs_and_folders_expand_sorted(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS)
    write_jsonl(tmp_path / "a.jsonl", [{"id": "z", "text": "zed"}])
    (tmp_path / "README.txt").write_text("not data")
    assert [p.rsplit("/", 1)[1] for p in expand_inputs([str(tmp_path / "*.jsonl")])] == ["a.jsonl", "b.jsonl"]
    assert [p.rsplit("/", 1)[1] for p in expand_inputs([str(tmp_path)])] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "*.parquet")])
