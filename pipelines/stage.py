"""What every curation stage shares: atomic Parquet output, its ledger and its stats.json."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.document import DOCUMENT_SCHEMA, Document, Ledger

DOCUMENTS_FILE = "documents.parquet"
LEDGER_FILE = "ledger.parquet"
STATS_FILE = "stats.json"
ROW_GROUP_ROWS = 8192

logger = logging.getLogger("frugal")


@dataclass(slots=True)
class StageStats:
    """Counts a stage reports: its ledger balances when n_in == n_kept + n_dropped."""

    stage: str
    n_in: int = 0
    n_kept: int = 0
    n_dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0  # UTF-8 bytes of the text of documents read
    bytes_kept: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # stage-specific figures (cluster sizes, ...)

    @classmethod
    def from_ledger(cls, ledger: Ledger, **kwargs) -> StageStats:
        reasons = Counter(_reason_key(r.reason) for r in ledger.rows if r.outcome == "dropped")
        n_dropped = sum(reasons.values())
        return cls(
            stage=ledger.stage,
            n_in=len(ledger.rows),
            n_kept=len(ledger.rows) - n_dropped,
            n_dropped=n_dropped,
            drop_reasons=dict(sorted(reasons.items())),
            **kwargs,
        )

    @classmethod
    def load(cls, output_dir: str | Path) -> StageStats:
        return cls(**json.loads((Path(output_dir) / STATS_FILE).read_text()))


def _reason_key(reason: str) -> str:
    """Drop reasons as counted: `near_duplicate:<cluster>` counts as `near_duplicate`."""
    return "near_duplicate" if reason.startswith("near_duplicate:") else reason


def atomic_path(final: Path) -> Path:
    """A fresh temp path `.NAME.PID.RANDOM.tmp` beside `final` (not created, so the file gets the usual umask
    permissions); the caller renames it over `final` when the write succeeded. Temp files of `final` whose
    writer no longer runs (a killed run) are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        pid = stale.name[len(final.name) + 2 :].split(".")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            stale.unlink(missing_ok=True)
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def write_table(table: pa.Table, path: Path) -> None:
    """Write a whole table as zstd Parquet, atomically."""
    tmp = atomic_path(path)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DocumentWriter:
    """Streams Documents into `documents.parquet` (zstd, row groups of ROW_GROUP_ROWS), atomically:
    the file appears under its name only when `close()` succeeds, so a crash leaves no half file."""

    def __init__(self, path: Path, schema: pa.Schema = DOCUMENT_SCHEMA):
        self.path = path
        self.schema = schema
        self._tmp = atomic_path(path)
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self._rows: list[dict] = []
        self.n_rows = 0
        self.n_bytes = 0

    def write(self, doc: Document, **extra_columns) -> None:
        row = doc.to_row()
        row.update(extra_columns)
        self._rows.append(row)
        self.n_rows += 1
        self.n_bytes += len(doc.text.encode("utf-8"))
        if len(self._rows) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def finish_stage(output_dir: Path, ledger: Ledger, started: float, **kwargs) -> StageStats:
    """Write the stage's ledger and stats.json; check the ledger balances (an invariant, not input)."""
    write_table(ledger.to_table(), output_dir / LEDGER_FILE)
    stats = StageStats.from_ledger(ledger, seconds=round(time.monotonic() - started, 3), **kwargs)
    assert stats.n_in == stats.n_kept + stats.n_dropped
    tmp = atomic_path(output_dir / STATS_FILE)
    tmp.write_text(json.dumps(asdict(stats), indent=2, sort_keys=True))
    os.replace(tmp, output_dir / STATS_FILE)
    return stats
