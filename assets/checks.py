"""Asset checks over the real outputs: schemas, unique ids, the near-duplicate rate, the ledger."""

import json
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.curation import near_dedup_documents
from assets.ledger import CURATION_ASSETS, CURATION_STAGES, balance_rows, document_ledger
from assets.metadata import md_table, text_table
from assets.quality import curriculum_shards
from assets.resources import CurationPaths
from pipelines.curriculum import MANIFEST_FILE, SHARD_SCHEMA, VERSIONS_DIR, sha256_file
from pipelines.document import DOCUMENT_SCHEMA, LEDGER_SCHEMA
from pipelines.near_dedup import CLUSTERS_FILE, CLUSTERS_SCHEMA, NEAR_DEDUP_SCHEMA
from pipelines.quality_score import SCORED_SCHEMA, SCORES_FILE, SCORES_SCHEMA
from pipelines.stage import DOCUMENTS_FILE, LEDGER_FILE

SCHEMAS = {
    "raw_documents": {DOCUMENTS_FILE: DOCUMENT_SCHEMA, LEDGER_FILE: LEDGER_SCHEMA},
    "clean_documents": {DOCUMENTS_FILE: DOCUMENT_SCHEMA, LEDGER_FILE: LEDGER_SCHEMA},
    "near_dedup_documents": {
        DOCUMENTS_FILE: NEAR_DEDUP_SCHEMA,
        CLUSTERS_FILE: CLUSTERS_SCHEMA,
        LEDGER_FILE: LEDGER_SCHEMA,
    },
    "filtered_documents": {DOCUMENTS_FILE: DOCUMENT_SCHEMA, LEDGER_FILE: LEDGER_SCHEMA},
    "scored_documents": {DOCUMENTS_FILE: SCORED_SCHEMA, SCORES_FILE: SCORES_SCHEMA, LEDGER_FILE: LEDGER_SCHEMA},
    "curriculum_shards": {"versions/*/shard-*.parquet": SHARD_SCHEMA, LEDGER_FILE: LEDGER_SCHEMA},
    "document_ledger": {LEDGER_FILE: LEDGER_SCHEMA},
}
PARTITIONED = {a.key.to_user_string() for a in CURATION_ASSETS if a.partitions_def is not None}
DOCUMENT_ASSETS = ("raw_documents", "clean_documents", "near_dedup_documents", "filtered_documents", "scored_documents")


def output_dir(context: dg.AssetCheckExecutionContext, paths: CurationPaths, asset_name: str) -> Path:
    """The folder a check reads: the checked drop's, for a partitioned asset."""
    if asset_name in PARTITIONED:
        return paths.partition_dir(asset_name, context.op_execution_context.partition_key)
    return paths.stage_dir(asset_name)


def _schema_check(asset_name: str, files: dict) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset_name, name="parquet_schema", description="Every file has the contract's schema.")
    def check(context: dg.AssetCheckExecutionContext, paths: CurationPaths) -> dg.AssetCheckResult:
        problems = []
        checked = []
        folder = output_dir(context, paths, asset_name)
        for pattern, expected in files.items():
            for path in sorted(folder.glob(pattern)):
                checked.append(path.name)
                actual = pq.read_schema(path)
                if not actual.remove_metadata().equals(expected, check_metadata=False):
                    problems.append((path.name, str(expected).replace("\n", "; "), str(actual).replace("\n", "; ")))
            if not any(folder.glob(pattern)):
                problems.append((pattern, "a file", "missing"))
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={
                "files": checked,
                "mismatches": dg.MetadataValue.md(md_table(("file", "expected", "actual"), problems)),
            },
        )

    return check


def _unique_ids_check(asset_name: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset_name, name="unique_ids", description="No two documents share an id.")
    def check(context: dg.AssetCheckExecutionContext, paths: CurationPaths) -> dg.AssetCheckResult:
        ids = pq.read_table(output_dir(context, paths, asset_name) / DOCUMENTS_FILE, columns=["id"])["id"]
        counts = pc.value_counts(ids)
        repeated = [(c["values"], c["counts"]) for c in counts.to_pylist() if c["counts"] > 1][:10]
        return dg.AssetCheckResult(
            passed=not repeated,
            metadata={
                "n_documents": len(ids),
                "repeated_ids": text_table(("id", "times"), repeated),
            },
        )

    return check


class NearDuplicateRateBounds(dg.Config):
    min_rate: float = 0.0
    """Fewer near-duplicates than this share suggests a broken stage (or an already deduped input)."""
    max_rate: float = 0.5
    """More than this share suggests a too-low threshold or a broken input."""


@dg.asset_check(asset=near_dedup_documents, description="The share of near-duplicates lies within bounds.")
def near_duplicate_rate_in_bounds(
    context: dg.AssetCheckExecutionContext, config: NearDuplicateRateBounds, paths: CurationPaths
) -> dg.AssetCheckResult:
    folder = output_dir(context, paths, "near_dedup_documents")
    clusters = pq.read_table(folder / CLUSTERS_FILE, columns=["kept"])
    n = clusters.num_rows
    rate = 0.0 if n == 0 else 1.0 - pc.sum(clusters["kept"]).as_py() / n
    return dg.AssetCheckResult(
        passed=config.min_rate <= rate <= config.max_rate,
        metadata={"near_duplicate_rate": rate, "min_rate": config.min_rate, "max_rate": config.max_rate},
    )


@dg.asset_check(asset=document_ledger, description="Per stage, per drop and overall: input = kept + dropped.")
def ledger_balances(paths: CurationPaths) -> dg.AssetCheckResult:
    """Each stage's rows cover its input exactly (one row per document of a drop, kept or dropped), and each
    stage's input is the previous stage's kept set; per drop and overall, input = kept at the end + dropped."""
    ledger = pq.read_table(paths.stage_dir("document_ledger") / LEDGER_FILE)
    rows, problems = [], []
    previous_kept = None
    for stage in CURATION_STAGES:
        part = ledger.filter(pc.equal(ledger["stage"], stage))
        outcome = part["outcome"]
        keys = list(zip(part["partition"].to_pylist(), part["id"].to_pylist()))
        kept_keys = {k for k, o in zip(keys, outcome.to_pylist()) if o == "kept"}
        n_kept = len(kept_keys)
        n_dropped = pc.sum(pc.equal(outcome, "dropped")).as_py() or 0
        n_other = part.num_rows - n_kept - n_dropped
        if len(set(keys)) != part.num_rows:
            problems.append(f"{stage}: a document has more than one ledger row in its drop")
        if n_other:
            problems.append(f"{stage}: {n_other} rows neither kept nor dropped")
        if previous_kept is not None and set(keys) != previous_kept:
            problems.append(f"{stage}: its input is not the previous stage's kept documents")
        rows.append((stage, part.num_rows, n_kept, n_dropped, part.num_rows == n_kept + n_dropped))
        previous_kept = kept_keys
    by_drop = balance_rows(ledger, "partition")
    problems += [f"drop {d}: {n_in} input != {kept} kept + {dropped} dropped"
                 for d, n_in, kept, dropped in by_drop if n_in != kept + dropped]  # fmt: skip
    n_input = rows[0][1]
    n_final = rows[-1][2]
    n_dropped_all = sum(r[3] for r in rows)
    if n_input != n_final + n_dropped_all:
        problems.append(f"overall: {n_input} input != {n_final} kept + {n_dropped_all} dropped")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "stages": dg.MetadataValue.md(md_table(("stage", "in", "kept", "dropped", "balances"), rows)),
            "drops": dg.MetadataValue.md(md_table(("drop", "input", "kept at the end", "dropped"), by_drop)),
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none"),
            "n_input": n_input,
            "n_final": n_final,
        },
    )


@dg.asset_check(asset=curriculum_shards, description="manifest.json matches the shard files (rows, sha256).")
def manifest_matches_shards(paths: CurationPaths) -> dg.AssetCheckResult:
    shard_dir = paths.stage_dir("curriculum_shards")
    manifest = json.loads((shard_dir / MANIFEST_FILE).read_text())
    problems = []
    for shard in manifest["shards"]:
        path = shard_dir / shard["path"]
        if not path.exists():
            problems.append(f"{shard['path']}: missing")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['path']}: sha256 differs from the manifest")
        if pq.ParquetFile(path).metadata.num_rows != shard["rows"]:
            problems.append(f"{shard['path']}: row count differs from the manifest")
    listed = {s["path"] for s in manifest["shards"]}
    folder = shard_dir / VERSIONS_DIR / f"v{manifest['version']:04d}" if "version" in manifest else shard_dir
    problems += [f"{p.relative_to(shard_dir)}: not in the manifest" for p in folder.glob("shard-*.parquet")
                 if p.relative_to(shard_dir).as_posix() not in listed]  # fmt: skip
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "n_shards": len(listed),
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none"),
        },
    )


@dg.asset_check(asset=curriculum_shards, description="Every curriculum bucket holds documents (a warning if not).")
def no_empty_bucket(paths: CurationPaths) -> dg.AssetCheckResult:
    manifest = json.loads((paths.stage_dir("curriculum_shards") / MANIFEST_FILE).read_text())
    empty = [
        f"bucket {b['bucket']} (quality tier {b['quality_tier']}, difficulty tier {b['difficulty_tier']})"
        for b in manifest["buckets"]
        if b["rows"] == 0
    ]
    return dg.AssetCheckResult(
        passed=not empty,
        severity=dg.AssetCheckSeverity.WARN,
        description=("empty: " + ", ".join(empty)) if empty else "every bucket holds documents",
        metadata={"bucket_rows": {str(b["bucket"]): b["rows"] for b in manifest["buckets"]}},
    )


class DropShareLimit(dg.Config):
    max_drop_share: float = 0.5
    """A stage that drops more than this share of its input warns (a bad default loses data quietly)."""
    top_reasons: int = 5
    """How many drop reasons the warning names, each with a few example ids."""


def _drop_share_check(asset_name: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset_name,
        name="drop_share_below_limit",
        description="Warns when the stage drops more than max_drop_share of its input, naming the top reasons.",
    )
    def check(
        context: dg.AssetCheckExecutionContext, config: DropShareLimit, paths: CurationPaths
    ) -> dg.AssetCheckResult:
        folder = output_dir(context, paths, asset_name)
        ledger = pq.read_table(folder / LEDGER_FILE, columns=["id", "outcome", "reason"])
        dropped = ledger.filter(pc.equal(ledger["outcome"], "dropped"))
        share = dropped.num_rows / ledger.num_rows if ledger.num_rows else 0.0
        by_reason: dict[str, list[str]] = {}
        for row in dropped.to_pylist():
            by_reason.setdefault(row["reason"], []).append(row["id"])
        top = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))[: config.top_reasons]
        rows = [(reason, len(ids), f"{len(ids) / ledger.num_rows:.1%}", ", ".join(ids[:3])) for reason, ids in top]
        passed = share <= config.max_drop_share
        names = "; ".join(f"{reason} ({n})" for reason, n, _, _ in rows)
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                f"drops {share:.0%} of its {ledger.num_rows} input documents"
                + ("" if passed else f", over the limit of {config.max_drop_share:.0%}: {names}")
            ),
            metadata={
                "drop_share": share,
                "max_drop_share": config.max_drop_share,
                "n_input": ledger.num_rows,
                "n_dropped": dropped.num_rows,
                "top_reasons": dg.MetadataValue.md(md_table(("reason", "dropped", "of input", "example ids"), rows)),
            },
        )

    return check


CHECKS = [
    *(_drop_share_check(name) for name in CURATION_STAGES),
    *(_schema_check(name, files) for name, files in SCHEMAS.items()),
    *(_unique_ids_check(name) for name in DOCUMENT_ASSETS),
    near_duplicate_rate_in_bounds,
    ledger_balances,
    manifest_matches_shards,
    no_empty_bucket,
]
