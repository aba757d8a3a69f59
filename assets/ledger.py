"""document_ledger: the per-stage ledgers of every curation stage in one Parquet file."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.curation import GROUP, clean_documents, near_dedup_documents, raw_documents
from assets.metadata import md_table
from assets.quality import curriculum_shards, filtered_documents, scored_documents
from assets.resources import CurationPaths
from pipelines.document import LEDGER_SCHEMA
from pipelines.stage import LEDGER_FILE, write_table

# The document stages in pipeline order: each one's input is the previous one's kept documents.
CURATION_ASSETS = [
    raw_documents,
    clean_documents,
    near_dedup_documents,
    filtered_documents,
    scored_documents,
    curriculum_shards,
]
CURATION_STAGES = tuple(a.key.to_user_string() for a in CURATION_ASSETS)


@dg.asset(group_name=GROUP, kinds={"parquet"}, deps=CURATION_ASSETS)
def document_ledger(context: dg.AssetExecutionContext, paths: CurationPaths) -> dg.MaterializeResult:
    """One row per input document per curation stage: kept, or dropped with its reason."""
    tables = [pq.read_table(paths.stage_dir(stage) / LEDGER_FILE) for stage in CURATION_STAGES]
    ledger = pa.concat_tables(tables).cast(LEDGER_SCHEMA)
    out = paths.stage_dir("document_ledger") / LEDGER_FILE
    write_table(ledger, out).commit()
    rows = []
    for stage, table in zip(CURATION_STAGES, tables):
        kept = pc.sum(pc.equal(table["outcome"], "kept")).as_py() or 0
        rows.append((stage, table.num_rows, kept, table.num_rows - kept))
    n_input, n_final = rows[0][1], rows[-1][2]
    n_dropped = sum(r[3] for r in rows)
    context.log.info(f"ledger: {n_input} input documents = {n_final} kept + {n_dropped} dropped")
    return dg.MaterializeResult(
        metadata={
            "n_rows": ledger.num_rows,
            "n_input_documents": n_input,
            "n_final_documents": n_final,
            "n_dropped_documents": n_dropped,
            "stages": dg.MetadataValue.md(md_table(("stage", "in", "kept", "dropped"), rows)),
            "path": dg.MetadataValue.path(str(out)),
        }
    )
