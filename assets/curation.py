"""Curation, first half: raw_documents -> clean_documents -> near_dedup_documents."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.config import stage_config, to_stage
from assets.drops import DROPS, SAMPLE_DROP, DropLocation
from assets.metadata import bar_chart_png, drop_reason_rows, md_table, png_md, rounded, sparkline_md, stage_metadata
from assets.resources import CurationPaths, WandbResource
from pipelines.clean import CleanConfig, clean
from pipelines.ingest import ingest
from pipelines.near_dedup import CLUSTERS_FILE, NearDedupConfig, near_dedup
from pipelines.readers import ReaderConfig
from pipelines.stage import DOCUMENTS_FILE, StageStats

GROUP = "curation"


RawDocumentsConfig = stage_config(
    ReaderConfig,
    "RawDocumentsConfig",
    doc="How a drop's records become documents; `inputs` overrides the drop's own files.",
    inputs=(list[str], Field(default_factory=list, description="JSONL (.gz/.zst), Parquet or WARC files, folders, "
                             "globs or fsspec URLs to read instead of the drop's own file or folder.")),
    sample_documents=(int, Field(default=3000, description="Size of the embedded sample corpus of the `sample` "
                                 "drop (it scales to 100,000 and more).")),
    sample_seed=(int, Field(default=0, description="Seed of the sample corpus's synthetic documents.")),
)  # fmt: skip
CleanDocumentsConfig = stage_config(CleanConfig, "CleanDocumentsConfig")
NearDedupDocumentsConfig = stage_config(NearDedupConfig, "NearDedupDocumentsConfig")


THUMBNAILS = ("cluster_sizes", "score_distribution")
"""The metadata entries that are a stage's thumbnail plot (assets.metadata.sparkline_md)."""


def finish_stage_asset(
    context: dg.AssetExecutionContext,
    wandb: WandbResource,
    stats: StageStats,
    out_dir: Path,
    config: dg.Config,
    extra_metadata: dict | None = None,
    images: dict[str, Path] | None = None,
) -> dg.MaterializeResult:
    extra_metadata = rounded(extra_metadata or {})
    # a thumbnail plot (a short Markdown value, which the UI shows inline) goes on top of the asset's page
    thumbnails = {k: v for k, v in extra_metadata.items() if k in THUMBNAILS}
    metadata = thumbnails | {k: v for k, v in stage_metadata(stats, out_dir / DOCUMENTS_FILE).items() if v is not None}
    metadata.update({k: v for k, v in extra_metadata.items() if k not in THUMBNAILS})
    if "stats" in metadata:  # only the figures no entry above already shows
        rest = {k: v for k, v in metadata["stats"].data.items() if k not in metadata}
        metadata["stats"] = dg.MetadataValue.json(rest) if rest else None
        metadata = {k: v for k, v in metadata.items() if v is not None}
    run_dir = wandb.log_run(
        context,
        job_type="curation",
        summary={"n_in": stats.n_in, "n_kept": stats.n_kept, "n_dropped": stats.n_dropped, "seconds": stats.seconds}
        | {f"dropped/{reason}": count for reason, count in stats.drop_reasons.items()},
        tables={"drop_reasons": (("reason", "documents", "share"), drop_reason_rows(stats))},
        images=images or {},
        config=config.model_dump(),
    )
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


def curation_asset(
    name: str, partitions_def=DROPS, automation=True, deps=(), kinds=("parquet",), **kwargs
) -> dg.AssetsDefinition:
    """The decorator of a curation asset: one partition per input drop, and (automation) materialized by Dagster's
    automation once the stage before it has the drop (`assets.sensors`)."""
    return dg.asset(
        name=name,
        group_name=GROUP,
        kinds=set(kinds),
        partitions_def=partitions_def,
        deps=list(deps),
        automation_condition=dg.AutomationCondition.eager() if automation else None,
        **kwargs,
    )


def drop_input(paths: CurationPaths, asset_name: str, drop: str) -> list[str]:
    """The documents a stage reads: the previous stage's output for the same drop."""
    return [str(paths.partition_dir(asset_name, drop) / DOCUMENTS_FILE)]


@curation_asset("raw_documents", automation=False)
def raw_documents(
    context: dg.AssetExecutionContext,
    config: RawDocumentsConfig,
    paths: CurationPaths,
    wandb: WandbResource,
    drops: DropLocation,
) -> dg.MaterializeResult:
    """Every input record of the drop as a document (id, text, source, metadata); malformed, empty and oversize
    records are ledgered, never silently lost. A drop's input is its file or folder in the drop location; the
    `sample` drop is the embedded sample corpus; `inputs` in the run config overrides both."""
    drop = context.partition_key
    out_dir = paths.partition_dir("raw_documents", drop)
    inputs = list(config.inputs)
    if not inputs and drop == SAMPLE_DROP:
        from pipelines.sample_corpus import SampleCorpusConfig, build_sample_corpus

        sample = Path(paths.data_dir) / "sample_corpus" / "corpus.jsonl.gz"
        context.log.info(f"drop {SAMPLE_DROP}: building the {config.sample_documents}-document sample corpus")
        build_sample_corpus(sample, SampleCorpusConfig(n_documents=config.sample_documents, seed=config.sample_seed))
        inputs = [str(sample)]
    elif not inputs:
        inputs = [drops.drop_url(drop)]
    stats = ingest(inputs, out_dir, to_stage(config, ReaderConfig), log=context.log)
    return finish_stage_asset(context, wandb, stats, out_dir, config, {"inputs": dg.MetadataValue.json(inputs)})


@curation_asset("clean_documents", deps=[raw_documents])
def clean_documents(
    context: dg.AssetExecutionContext, config: CleanDocumentsConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """Unicode-repaired (ftfy), NFC-normalised text without control characters, e-mail addresses, public IPs
    and phone numbers replaced by placeholders; exact duplicates of the clean text dropped (the first kept, in
    this drop or in a drop indexed before it)."""
    drop = context.partition_key
    out_dir = paths.partition_dir("clean_documents", drop)
    stats = clean(
        drop_input(paths, "raw_documents", drop),
        out_dir,
        to_stage(config, CleanConfig),
        log=context.log,
        index_dir=paths.index_dir("clean_documents"),
        partition=drop,
    )
    pii = {f"pii_redacted_{kind}": n for kind, n in stats.extra["pii_redacted"].items()}
    return finish_stage_asset(context, wandb, stats, out_dir, config, pii)


@curation_asset("near_dedup_documents", deps=[clean_documents])
def near_dedup_documents(
    context: dg.AssetExecutionContext, config: NearDedupDocumentsConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """One representative per MinHash-LSH near-duplicate cluster; every document keeps its cluster_id
    (clusters.parquet). A drop is clustered with the drops indexed before it, and only its own documents are
    hashed; a cluster that holds an earlier drop's documents keeps the one that drop kept."""
    drop = context.partition_key
    out_dir = paths.partition_dir("near_dedup_documents", drop)
    stats = near_dedup(drop_input(paths, "clean_documents", drop), out_dir, to_stage(config, NearDedupConfig),
                       log=context.log, index_dir=paths.index_dir("near_dedup_documents"), partition=drop)  # fmt: skip
    hist = stats.extra["cluster_size_histogram"]
    png = bar_chart_png(
        hist, out_dir / "cluster_sizes.png", "Near-duplicate cluster sizes", "documents in cluster", "clusters"
    )
    sizes = [hist.get(str(k), 0) for k in range(1, max(map(int, hist), default=1) + 1)]
    extra = {
        "cluster_sizes": dg.MetadataValue.md(
            sparkline_md(sizes, "clusters by size") + f" clusters of 1 to {len(sizes)} documents (log scale)"
        ),
        "near_duplicate_rate": stats.extra["near_duplicate_rate"],
        "n_clusters": stats.extra["n_clusters"],
        "lsh_bands_x_rows": f"{stats.extra['bands']} x {stats.extra['rows']}",
        "cluster_size_histogram": dg.MetadataValue.md(
            md_table(("cluster size", "clusters"), list(hist.items())) + "\n\n" + png_md(png, "cluster sizes")
        ),
        "clusters_path": dg.MetadataValue.path(str(out_dir / CLUSTERS_FILE)),
    }
    return finish_stage_asset(context, wandb, stats, out_dir, config, extra, images={"cluster_sizes": png})
