"""What every curation stage shares: atomic Parquet output, its ledger and its stats.json."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
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


class Pending:
    """A file written whole under a temp name (`atomic_path`), renamed into place by `finish_stage` together with
    the stage's other files: a stage that fails (a full disk, a read-only folder, bad input) leaves the previous
    run's files as they were, all of them, never a mix of two runs."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.tmp = atomic_path(self.final)

    def commit(self) -> None:
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this; nothing was written there
            self.tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """Yields the temp path to write; an OSError (no space left, read-only folder) names the final file and
        discards the temp file."""
        try:
            yield self.tmp
        except OSError as e:
            self.discard()
            code = e.errno or next((int(m) for m in re.findall(r"\[errno (\d+)\]", str(e))), None)  # pyarrow's
            raise OSError(code, f"{self.final}: cannot write: {os.strerror(code) if code else e}") from e
        except BaseException:
            self.discard()
            raise


def write_table(table: pa.Table, path: Path) -> Pending:
    """Write a whole table as zstd Parquet under a temp name; `finish_stage` renames it into place."""
    pending = Pending(path)
    with pending.writing() as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return pending


class DocumentWriter:
    """Streams Documents into `documents.parquet` (zstd, row groups of ROW_GROUP_ROWS) under a temp name: the file
    appears under its name only when `finish_stage` commits the stage (`.pending`), so a crash leaves no half file."""

    def __init__(self, path: Path, schema: pa.Schema = DOCUMENT_SCHEMA):
        self.path = path
        self.schema = schema
        self.pending = Pending(path)
        with self.pending.writing() as tmp:
            self._writer = pq.ParquetWriter(tmp, schema, compression="zstd")
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
            with self.pending.writing():
                self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        with self.pending.writing():
            self._writer.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._writer.close()
        self.pending.discard()

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def finish_stage(
    output_dir: Path, ledger: Ledger, started: float, files: Sequence[Pending | DocumentWriter] = (), **kwargs
) -> StageStats:
    """Write the stage's ledger and stats.json; check the ledger balances (an invariant, not input); then rename
    the stage's files (`files`, the ledger, stats.json) into place together. On an error none is renamed."""
    pending = [f.pending if isinstance(f, DocumentWriter) else f for f in files]
    try:
        pending.append(write_table(ledger.to_table(), output_dir / LEDGER_FILE))
        stats = StageStats.from_ledger(ledger, seconds=round(time.monotonic() - started, 3), **kwargs)
        assert stats.n_in == stats.n_kept + stats.n_dropped
        pending.append(Pending(output_dir / STATS_FILE))
        with pending[-1].writing() as tmp:
            tmp.write_text(json.dumps(asdict(stats), indent=2, sort_keys=True))
    except BaseException:
        for p in pending:
            p.discard()
        raise
    for p in pending:  # renames: no space is needed, so these do not fail for a full disk
        p.commit()
    return stats
