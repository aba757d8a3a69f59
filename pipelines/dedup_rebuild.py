"""Rebuild the dedup index of a partitioned stage from its drops' own outputs (pipelines.dedup_index).

CLI: python -m pipelines.dedup_rebuild data/near_dedup_documents   (or data/clean_documents)

Each drop's stats.json records its place in the index, its inputs and the index parameters. The stage runs again on
each drop in that order, against the index rebuilt so far, which gives the same tables and the same outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipelines.clean import STAGE as CLEAN_STAGE
from pipelines.clean import rerun_partition as rerun_clean
from pipelines.dedup_index import INDEX_DIR, PARTITIONS_DIR, DedupIndexError
from pipelines.near_dedup import STAGE as NEAR_DEDUP_STAGE
from pipelines.near_dedup import rerun_partition as rerun_near_dedup
from pipelines.stage import STATS_FILE

RERUN = {CLEAN_STAGE: rerun_clean, NEAR_DEDUP_STAGE: rerun_near_dedup}


def rebuild(stage_dir: str | Path, log=print) -> list[str]:
    """Rebuild `STAGE_DIR/index` by re-running the stage on each drop, in the order the drops were indexed (as
    recorded in each drop's stats.json). The outputs are rewritten with the same content. Returns the drop keys."""
    stage_dir = Path(stage_dir)
    records = []
    for stats_file in sorted((stage_dir / PARTITIONS_DIR).glob(f"*/{STATS_FILE}")):
        stats = json.loads(stats_file.read_text())
        record = stats.get("extra", {}).get("index")
        if record is None:
            raise DedupIndexError(f"{stats_file}: no index record (made without an index)")
        records.append((record["position"], stats["stage"], stats_file.parent, record))
    if not records:
        raise DedupIndexError(f"{stage_dir / PARTITIONS_DIR}: no drops to rebuild the index from")
    shutil.rmtree(stage_dir / INDEX_DIR, ignore_errors=True)
    keys = []
    for _, stage, out_dir, record in sorted(records, key=lambda r: r[0]):
        log(f"{stage}: re-indexing drop {record['partition']}")
        RERUN[stage](record, out_dir, stage_dir / INDEX_DIR)
        keys.append(record["partition"])
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage_dir", help="the stage's folder: its index/ is rebuilt from its partitions/")
    args = parser.parse_args(argv)
    try:
        keys = rebuild(args.stage_dir, log=lambda m: print(m, file=sys.stderr))
    except DedupIndexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rebuilt {Path(args.stage_dir) / INDEX_DIR} from {len(keys)} drops: {', '.join(keys)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
