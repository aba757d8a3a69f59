"""document_ledger: the per-stage ledgers of every curation stage in one Parquet file."""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.curation import clean_documents, curation_asset, near_dedup_documents, raw_documents
from assets.drops import DROPS
from assets.metadata import column_schema, md_table, png_md, sparkline_md
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


def stage_ledgers(paths: CurationPaths, drops: list[str]) -> list[pa.Table]:
    """Each curation stage's ledger over all drops, in CURATION_STAGES order. curriculum_shards is one for all drops:
    its rows get the drop of the scored document they come from."""
    tables = []
    for asset in CURATION_ASSETS:
        stage = asset.key.to_user_string()
        if asset.partitions_def is None:
            table = pq.read_table(paths.stage_dir(stage) / LEDGER_FILE)
            previous = tables[-1].filter(pc.equal(tables[-1]["outcome"], "kept"))
            drop_of = dict(zip(previous["id"].to_pylist(), previous["partition"].to_pylist()))
            table = with_drop(table, [drop_of.get(i, "") for i in table["id"].to_pylist()])
        else:  # each drop's rows carry its name (the stages that do not know it leave it empty)
            files = paths.partition_files(stage, LEDGER_FILE, drops)
            parts = [with_drop(pq.read_table(f), f.parent.name) for f in files]
            table = pa.concat_tables(parts) if parts else LEDGER_SCHEMA.empty_table()
        tables.append(table.cast(LEDGER_SCHEMA))
    return tables


def with_drop(table: pa.Table, drop: str | list[str]) -> pa.Table:
    """The ledger table with its `partition` column set to `drop` (one name, or one per row)."""
    column = pa.array([drop] * table.num_rows if isinstance(drop, str) else drop, pa.string())
    return table.set_column(table.schema.get_field_index("partition"), "partition", column)


def balance_rows(ledger: pa.Table, key: str) -> list[tuple]:
    """Per value of `key` (stage or partition): input documents (the first stage's rows), kept at the end, dropped
    by any stage, and whether input == kept + dropped."""
    first, last = CURATION_STAGES[0], CURATION_STAGES[-1]
    out = []
    for value in dict.fromkeys(ledger[key].to_pylist()):
        part = ledger.filter(pc.equal(ledger[key], value))
        if key == "stage":
            n_in = part.num_rows
            n_kept = pc.sum(pc.equal(part["outcome"], "kept")).as_py() or 0
        else:
            n_in = pc.sum(pc.equal(part["stage"], first)).as_py() or 0
            n_kept = pc.sum(pc.and_(pc.equal(part["stage"], last), pc.equal(part["outcome"], "kept"))).as_py() or 0
        n_dropped = pc.sum(pc.equal(part["outcome"], "dropped")).as_py() or 0
        out.append((value, n_in, n_kept, n_dropped))
    return out


@curation_asset("document_ledger", partitions_def=None, deps=CURATION_ASSETS)
def document_ledger(
    context: dg.AssetExecutionContext, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """One row per input document per curation stage, with its drop: kept, or dropped with its reason; the balance
    per stage and per drop; per source, the share of its documents kept after each stage (a table and a plot)."""
    drops = context.instance.get_dynamic_partitions(DROPS.name)
    tables = stage_ledgers(paths, drops)
    ledger = pa.concat_tables(tables)
    out = paths.stage_dir("document_ledger") / LEDGER_FILE
    write_table(ledger, out).commit()
    rows = [r[:4] for r in balance_rows(ledger, "stage")]
    by_drop = [(d, n_in, kept, dropped, n_in == kept + dropped) for d, n_in, kept, dropped in
               balance_rows(ledger, "partition")]  # fmt: skip
    n_input, n_final = rows[0][1], rows[-1][2]
    n_dropped = sum(r[3] for r in rows)
    context.log.info(f"ledger: {n_input} input documents of {len(by_drop)} drops = {n_final} kept + {n_dropped} "
                     "dropped")  # fmt: skip
    raw = pa.concat_tables([pq.read_table(f, columns=["id", "source"])
                            for f in paths.partition_files(CURATION_STAGES[0], DOCUMENTS_FILE, drops)])  # fmt: skip
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
            "kept": dg.MetadataValue.md(
                sparkline_md([r[2] for r in rows], "documents kept after each stage")
                + f" documents kept after each stage, {n_input} to {n_final}"
            ),
            "dagster/row_count": ledger.num_rows,
            "dagster/column_schema": column_schema(LEDGER_SCHEMA),
            "n_input_documents": n_input,
            "n_final_documents": n_final,
            "n_dropped_documents": n_dropped,
            "stages": dg.MetadataValue.md(md_table(("stage", "in", "kept", "dropped"), rows)),
            "drops": dg.MetadataValue.md(
                md_table(("drop", "input", "kept at the end", "dropped", "balances"), by_drop)
            ),
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
