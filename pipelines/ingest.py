"""raw_documents: read the configured inputs into one Parquet file, ledgering every bad record.

CLI: python -m pipelines.ingest --input PATH [PATH ...] --output DIR
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipelines.cli import reader_config, run_stage, stage_parser
from pipelines.document import Document, Ledger
from pipelines.progress import track
from pipelines.readers import ReaderConfig, count_records, read_documents
from pipelines.stage import DOCUMENTS_FILE, DocumentWriter, StageStats, finish_stage, logger

STAGE = "raw_documents"


def ingest(
    inputs: list[str],
    output_dir: str | Path,
    reader: ReaderConfig | None = None,
    log: logging.Logger | None = logger,
) -> StageStats:
    """Stream every input record into `output_dir/documents.parquet`; malformed, empty and oversize
    records go to the ledger only. Streams: memory holds the set of ids seen, not the documents."""
    started = time.monotonic()
    output_dir = Path(output_dir)
    ledger = Ledger(STAGE)
    bytes_in = 0
    with DocumentWriter(output_dir / DOCUMENTS_FILE) as writer:
        records = read_documents(inputs, reader)
        for record in track(records, desc=STAGE, total=count_records(inputs), log=log):
            if isinstance(record, Document):
                bytes_in += len(record.text.encode("utf-8"))
                writer.write(record)
                ledger.kept(record)
            else:
                ledger.rejected(record)
    return finish_stage(output_dir, ledger, started, [writer], bytes_in=bytes_in, bytes_kept=writer.n_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    return run_stage(ingest, args.input, args.output, reader_config(args))


if __name__ == "__main__":
    raise SystemExit(main())
