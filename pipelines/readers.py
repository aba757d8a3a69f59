"""Readers: JSONL (plain, .gz, .zst), Parquet and WARC, from local paths, globs or fsspec URLs.

Every input record becomes either a `Document` or a `Rejected` (malformed, empty, oversize) with
the file and line it came from, so a stage can account for every record in its ledger. Problems
with a whole input (a missing path, an unknown format, an unreadable or corrupt file) raise
`InputError` naming the file (and line, where one is known).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import fsspec.core
import pyarrow.parquet as pq

from pipelines.document import Document, Rejected
from pipelines.text import html_main_text

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd"}
PARQUET_SUFFIXES = (".parquet",)
WARC_SUFFIXES = (".warc", ".warc.gz")
KNOWN_FORMATS = "JSONL (.jsonl/.json/.ndjson, optionally .gz or .zst), Parquet (.parquet), WARC (.warc, .warc.gz)"


class InputError(ValueError):
    """A whole input cannot be read: the message names the file (and line, where known)."""


@dataclass(kw_only=True, slots=True)
class ReaderConfig:
    """How input records become Documents."""

    text_key: str = "text"
    """Field holding the document text (JSONL and Parquet)."""
    id_key: str = "id"
    """Field holding the unique id; when absent, the id is FILE_STEM/LINE."""
    max_chars: int = 1_000_000
    """Documents with more characters than this are dropped as `oversize`."""
    default_source: str | None = None
    """`source` for records without one; None uses the input file's name."""


def detect_format(path: str) -> str:
    """ "jsonl", "parquet" or "warc" from the file name; InputError for anything else."""
    name = path.lower()
    if name.endswith(WARC_SUFFIXES):
        return "warc"
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise InputError(f"{path}: unknown input format; expected {KNOWN_FORMATS}")


def expand_inputs(inputs: list[str]) -> list[str]:
    """Local paths, folders, globs and fsspec URLs -> a sorted list of file URLs, each of known format.

    A folder contributes the files of known format below it; a path or glob that matches nothing
    raises InputError.
    """
    if not inputs:
        raise InputError("no input given")
    files: list[str] = []
    for spec in inputs:
        fs, path = fsspec.core.url_to_fs(spec)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        matches = sorted(fs.glob(path)) if fsspec.core.has_magic(path) else ([path] if fs.exists(path) else [])
        if not matches:
            raise InputError(f"{spec}: no such file or folder")
        for match in matches:
            if fs.isdir(match):
                found = [p for p in sorted(fs.find(match)) if _is_known(p)]
                if not found:
                    raise InputError(f"{spec}: folder holds no file of a known format ({KNOWN_FORMATS})")
                files.extend(prefix + p for p in found)
            else:
                detect_format(match)
                files.append(prefix + match)
    return files


def _is_known(path: str) -> bool:
    try:
        detect_format(path)
    except InputError:
        return False
    return True


def read_documents(inputs: list[str], config: ReaderConfig | None = None) -> Iterator[Document | Rejected]:
    """Every record of every input, in order, as a Document or a Rejected; ids are checked unique.

    A Rejected for a malformed record is keyed by its FILE:LINE, since its id may be missing or taken.
    """
    config = config or ReaderConfig()
    seen_ids: dict[str, str] = {}
    for path in expand_inputs(inputs):
        fmt = detect_format(path)
        records = {"jsonl": _read_jsonl, "parquet": _read_parquet, "warc": _read_warc}[fmt](path, config)
        for record in records:
            if isinstance(record, Rejected):
                yield record
                continue
            first = seen_ids.get(record.id)
            if first is not None:
                yield Rejected(
                    record.location, "malformed", f"duplicate id {record.id!r}, first seen at {first}", record.location
                )
                continue
            seen_ids[record.id] = record.location
            yield _check_size(record, config)


def count_records(inputs: list[str]) -> int | None:
    """Number of records when cheaply known (Parquet footers), else None (for progress bars)."""
    total = 0
    for path in expand_inputs(inputs):
        if detect_format(path) != "parquet":
            return None
        try:
            with fsspec.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except (OSError, ValueError) as e:  # pyarrow's messages do not say which file
            raise InputError(f"{path}: cannot read Parquet: {e}") from e
    return total


def _check_size(doc: Document, config: ReaderConfig) -> Document | Rejected:
    if not doc.text.strip():
        return Rejected(doc.id, "empty", "text is empty or white space only", doc.location)
    if len(doc.text) > config.max_chars:
        return Rejected(doc.id, "oversize", f"{len(doc.text)} characters > max_chars={config.max_chars}", doc.location)
    return doc


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (*COMPRESSION_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES, ".warc"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _from_mapping(row: object, location: str, fallback_id: str, config: ReaderConfig, source: str):
    """A JSON object or Parquet row -> Document, or Rejected("malformed") saying which field is wrong.
    Fields other than id, text, source and metadata are added to metadata."""
    if not isinstance(row, dict):
        return Rejected(location, "malformed", f"expected a JSON object, got {type(row).__name__}", location)
    raw_id = row.get(config.id_key, fallback_id)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == "":
        return Rejected(location, "malformed", f"field {config.id_key!r} must be a non-empty string or int", location)
    doc_id = str(raw_id)
    text = row.get(config.text_key)
    if not isinstance(text, str):
        what = "missing" if config.text_key not in row else f"a {type(text).__name__}, not a string"
        return Rejected(location, "malformed", f"field {config.text_key!r} is {what} (id {doc_id!r})", location)
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            metadata = None
    if not isinstance(metadata, dict):
        return Rejected(location, "malformed", f"field 'metadata' must be an object (id {doc_id!r})", location)
    # Other fields (a stage's extra columns such as cluster_id or quality_score) travel in metadata.
    extra = {k: v for k, v in row.items() if k not in (config.id_key, config.text_key, "source", "metadata")}
    if extra:
        metadata = {**extra, **metadata}
    row_source = row.get("source")
    row_source = row_source if isinstance(row_source, str) and row_source else source
    doc = Document(doc_id, text, row_source, metadata, location)
    unencodable = _unencodable_field(doc)
    if unencodable:
        return Rejected(location, "malformed", f"{unencodable} (id {doc_id[:80]!r})", location)
    return doc


def _unencodable_field(doc: Document) -> str | None:
    """What in the document cannot be written as UTF-8 (a lone surrogate such as JSON's "\\ud800"), or None.
    Parquet stores UTF-8 only, so such a document could not be written by any stage."""
    fields = {"id": doc.id, "text": doc.text, "source": doc.source}
    try:
        fields["metadata"] = json.dumps(doc.metadata, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        return f"field 'metadata' is not JSON ({e})"
    for name, value in fields.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"field {name!r} holds a lone surrogate (U+{ord(value[e.start]):04X}) at character {e.start}"
    return None


def _open(path: str, compression: str | None = "infer"):
    """The file's (decompressed) bytes as a line-iterable binary stream. .gz and .zst go through _CheckedStream,
    which raises at a stream that ends early: the gzip and zstd readers that fsspec and warcio use can stop
    quietly there, and a truncated file would read as a shorter one."""
    kind = compression
    if compression == "infer":
        kind = next((k for suffix, k in COMPRESSION_SUFFIXES.items() if path.lower().endswith(suffix)), None)
    try:
        raw = fsspec.open(path, "rb").open()
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot open: {e}") from e
    return io.BufferedReader(_CheckedStream(raw, kind)) if kind else raw


class _CheckedStream(io.RawIOBase):
    """Decompresses gzip or zstd (one or more members or frames), raising OSError when the input ends inside one,
    or holds bytes that are not a stream of that kind."""

    def __init__(self, raw, kind: str):
        import zlib

        import zstandard

        self._raw, self._kind, self._zlib, self._zstd = raw, kind, zlib, zstandard
        self._errors = (zlib.error, zstandard.ZstdError)
        self._dobj = self._new()
        self._pending = b""
        self._started = False

    def _new(self):
        if self._kind == "gzip":
            return self._zlib.decompressobj(wbits=31)
        return self._zstd.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._started and not self._dobj.eof:
                    raise OSError(f"the {self._kind} stream ends early: the file is truncated")
                return 0
            while chunk:
                if self._dobj.eof:  # the next member (gzip) or frame (zstd)
                    self._dobj = self._new()
                try:
                    self._pending += self._dobj.decompress(chunk)
                except self._errors as e:
                    raise OSError(f"corrupt {self._kind} data ({e})") from e
                self._started = True
                chunk = self._dobj.unused_data if self._dobj.eof else b""
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _read_jsonl(path: str, config: ReaderConfig) -> Iterator[Document | Rejected]:
    source = config.default_source or _stem(path)
    f = _open(path)
    line_no = 0
    try:
        with f:
            for line_no, raw in enumerate(f, start=1):
                location = f"{path}:{line_no}"
                if not raw.strip():
                    continue  # blank lines separate nothing and hold no record
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Rejected(location, "malformed", f"invalid UTF-8 at byte {e.start}", location)
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Rejected(location, "malformed", f"invalid JSON: {e.msg} (column {e.colno})", location)
                    continue
                except RecursionError:
                    yield Rejected(location, "malformed", "invalid JSON: nested too deeply", location)
                    continue
                yield _from_mapping(row, location, f"{source}/{line_no}", config, source)
    except (OSError, EOFError, ValueError) as e:  # truncated or corrupt compressed stream
        raise InputError(f"{path}:{line_no + 1}: cannot read: {e}") from e


def _read_parquet(path: str, config: ReaderConfig) -> Iterator[Document | Rejected]:
    source = config.default_source or _stem(path)
    f = _open(path, compression=None)
    try:
        with f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if config.text_key not in names:
                raise InputError(f"{path}: no column {config.text_key!r} (columns: {', '.join(names)})")
            row_no = 0
            for batch in parquet.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    row_no += 1
                    yield _from_mapping(row, f"{path}:row {row_no}", f"{source}/{row_no}", config, source)
    except (OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: cannot read Parquet: {e}") from e


def _read_warc(path: str, config: ReaderConfig) -> Iterator[Document | Rejected]:
    """HTTP responses with HTML become their main text (resiliparse); plain text and WET conversion
    records are taken as they are; other record types (requests, metadata) are not documents.

    A truncated or corrupt file is an InputError naming the record, never a silently shorter document: a .warc.gz
    is decompressed by Python's gzip (which notices a stream that ends early, where warcio's reader stops quietly),
    and each record must deliver every byte its Content-Length declares."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    from resiliparse.parse.html import HTMLTree
    from warcio.archiveiterator import ArchiveIterator

    source = config.default_source or _stem(path)
    f = _open(path, compression="gzip" if path.lower().endswith(".gz") else None)
    n = 0  # the record being read
    try:
        with f:
            records = ArchiveIterator(f)
            while True:
                n += 1
                record = next(records, None)
                if record is None:
                    return
                if record.rec_type not in ("response", "resource", "conversion"):
                    continue
                location = f"{path}:record {n}"
                headers = record.rec_headers
                doc_id = headers.get_header("WARC-Record-ID") or location
                ctype = (record.http_headers.get_header("Content-Type") if record.http_headers else None) or ""
                ctype = ctype or headers.get_header("Content-Type") or ""
                payload = record.content_stream().read()
                missing = getattr(record.raw_stream, "limit", 0)  # warcio's LimitReader: declared bytes not read
                if missing:
                    raise InputError(f"{location}: truncated: {missing} bytes of its Content-Length are missing")
                if "html" in ctype.lower():
                    text = html_main_text(HTMLTree.parse_from_bytes(payload))
                elif ctype.lower().startswith("text/") or record.rec_type == "conversion":
                    text = bytes_to_str(payload, detect_encoding(payload))
                else:
                    yield Rejected(location, "malformed", f"WARC payload is {ctype or 'untyped'}, not text", location)
                    continue
                metadata = {"url": headers.get_header("WARC-Target-URI"), "date": headers.get_header("WARC-Date")}
                doc = Document(doc_id, text, source, metadata, location)
                unencodable = _unencodable_field(doc)
                yield doc if unencodable is None else Rejected(location, "malformed", unencodable, location)
    except InputError:
        raise
    except Exception as e:  # warcio raises its own ArchiveLoadFailed and plain exceptions on corruption
        raise InputError(
            f"{path}:record {n}: cannot read WARC: the record is malformed or the file is truncated "
            f"({type(e).__name__}: {e})"
        ) from e
