"""document_ledger: the per-stage ledgers of every curation stage in one Parquet file."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.curation import GROUP, clean_documents, near_dedup_documents, raw_documents
from assets.metadata import md_table, png_md
from assets.quality import curriculum_shards, filtered_documents, scored_documents
from assets.resources import CurationPaths, WandbResource
from model.io import atomic_file
from pipelines.document import LEDGER_SCHEMA, kept_by_source
from pipelines.stage import DOCUMENTS_FILE, LEDGER_FILE, write_table

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
def document_ledger(
    context: dg.AssetExecutionContext, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """One row per input document per curation stage: kept, or dropped with its reason; per source, the share
    of its documents kept after each stage (a table and a plot)."""
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
    raw = pq.read_table(paths.stage_dir(CURATION_STAGES[0]) / DOCUMENTS_FILE, columns=["id", "source"])
    sources = kept_by_source(
        dict(zip(CURATION_STAGES, tables)), dict(zip(raw["id"].to_pylist(), raw["source"].to_pylist()))
    )
    source_rows = [
        (r["source"], r["input"], *(f"{r[s] / r['input']:.0%}" if r["input"] else "-" for s in CURATION_STAGES[1:]))
        for r in sources
    ]
    png = kept_by_source_png(sources, paths.stage_dir("document_ledger") / "kept_by_source.png")
    columns = ("source", "input", *(f"after {s}" for s in CURATION_STAGES[1:]))
    summary = {"n_input_documents": n_input, "n_final_documents": n_final, "n_dropped_documents": n_dropped}
    wandb.log_run(context, "document_ledger", summary, tables={"kept_by_source": (columns, source_rows)},
                  images={"kept_by_source": png})  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "n_rows": ledger.num_rows,
            "n_input_documents": n_input,
            "n_final_documents": n_final,
            "n_dropped_documents": n_dropped,
            "stages": dg.MetadataValue.md(md_table(("stage", "in", "kept", "dropped"), rows)),
            "kept_by_source": dg.MetadataValue.md(
                md_table(columns, source_rows) + "\n\n" + png_md(png, "share of each source kept after each stage")
            ),
            "path": dg.MetadataValue.path(str(out)),
        }
    )


def kept_by_source_png(sources: list[dict], path) -> object:
    """One line per source: the share of its input documents kept after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    stages = list(CURATION_STAGES)
    for r in sources:
        ax.plot(
            range(len(stages)), [r[s] / r["input"] if r["input"] else 0 for s in stages], marker="o", label=r["source"]
        )
    ax.set_xticks(range(len(stages)), [s.replace("_", "\n") for s in stages], fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="share kept", title="Where each source went")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
