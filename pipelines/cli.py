"""The command line every stage shares: --input PATH... --output DIR, a summary at the end."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from pipelines.readers import InputError, ReaderConfig
from pipelines.stage import StageStats


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL/Parquet/WARC files, folders, globs or URLs")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--max-chars", type=int, default=ReaderConfig().max_chars, help="oversize cap per document")
    parser.add_argument("--text-key", default="text", help="field holding the text")
    parser.add_argument("--id-key", default="id", help="field holding the id")
    return parser


def reader_config(args: argparse.Namespace) -> ReaderConfig:
    return ReaderConfig(text_key=args.text_key, id_key=args.id_key, max_chars=args.max_chars)


def run_stage(fn, *args, **kwargs) -> int:
    """Run a stage function from a CLI: log to stderr, print the dataclass it returns (its stats or
    metrics) as JSON; exit 2 on bad input, 1 when an output cannot be written (a full disk, a read-only
    folder: the message names the file, and the previous output is left as it was)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        stats: StageStats = fn(*args, **kwargs)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror if e.strerror and e.filename is None else e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(stats), indent=2))
    return 0
