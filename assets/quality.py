"""Curation, second half: filtered_documents -> (quality_classifier) -> scored_documents -> curriculum_shards."""

import dataclasses
import json
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
from pydantic import Field

from assets.config import stage_config, to_stage
from assets.curation import curation_asset, drop_input, finish_stage_asset, near_dedup_documents, raw_documents
from assets.drops import DROPS
from assets.metadata import bar_chart_png, column_schema, md_table, png_md, sparkline_md, text_table
from assets.resources import CurationPaths, WandbResource
from model.io import atomic_file
from pipelines.curriculum import MANIFEST_FILE, SHARD_SCHEMA, CurriculumConfig, build_curriculum_version
from pipelines.filters import FILTER_NAMES, FilterConfig, filter_documents
from pipelines.quality import MODEL_FILE, QualityModelConfig, resemblance, train_quality_classifier
from pipelines.quality_score import SCORES_FILE, ScoreConfig, score_documents
from pipelines.reference import DOMAINS, ReferenceConfig
from pipelines.stage import DOCUMENTS_FILE

FilteredDocumentsConfig = stage_config(
    FilterConfig,
    "FilteredDocumentsConfig",
    exclude=(*FILTER_NAMES, "lid_model"),  # the filters' own settings: filter_overrides; lid.176 ships with the project
    disabled_filters=(list[str], Field(default_factory=list, description="Heuristic filters to switch off: "
                                       + ", ".join(FILTER_NAMES) + ".")),
    filter_overrides=(dict[str, dict[str, Any]], Field(default_factory=dict, description="Per filter, keyword "
                      "arguments of its datatrove class over the project's defaults, e.g. "
                      "{gopher_quality: {min_doc_words: 20}}.")),
)  # fmt: skip


QualityClassifierConfig = stage_config(
    QualityModelConfig,
    "QualityClassifierConfig",
    positives=(list[str], Field(default_factory=list, description="Reference (high-quality) document files; "
               "empty uses the reference domains (pipelines.reference).")),
    negatives=(list[str], Field(default_factory=list, description="Extra negative files, e.g. a sample of a "
               "general crawl; junk made from the positives is always used. Never the corpus being curated: the "
               'classifier would learn "not this corpus".')),
    reference_domains=(list[str], Field(default_factory=lambda: list(DOMAINS), description="The reference "
                       "domains to use when no positives are given (those this machine lacks are left out).")),
    max_per_domain=(int, Field(default=ReferenceConfig().max_per_domain, description="Reference documents per "
                    "domain (a seeded sample).")),
)  # fmt: skip


ScoredDocumentsConfig = stage_config(ScoreConfig, "ScoredDocumentsConfig")
CurriculumShardsConfig = stage_config(CurriculumConfig, "CurriculumShardsConfig")


@curation_asset("filtered_documents", deps=[near_dedup_documents])
def filtered_documents(
    context: dg.AssetExecutionContext, config: FilteredDocumentsConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """Documents in the configured languages (fastText lid.176) that pass the Gopher, C4 and FineWeb
    heuristics (datatrove's filters)."""
    unknown = set(config.disabled_filters) - set(FILTER_NAMES)
    if unknown:
        raise ValueError(f"disabled_filters: unknown filters {sorted(unknown)}; known: {list(FILTER_NAMES)}")
    stage = to_stage(config, FilterConfig)
    for name, kwargs in config.filter_overrides.items():
        if name not in FILTER_NAMES:
            raise ValueError(f"filter_overrides: unknown filter {name!r}; known: {list(FILTER_NAMES)}")
        setattr(stage, name, {**getattr(stage, name), **kwargs})
    for name in config.disabled_filters:
        setattr(stage, name, None)
    drop = context.partition_key
    out_dir = paths.partition_dir("filtered_documents", drop)
    stats = filter_documents(drop_input(paths, "near_dedup_documents", drop), out_dir, stage, log=context.log)
    if stats.n_kept == 0:
        raise ValueError(
            f"filtered_documents: the filters dropped all {stats.n_in} documents of drop {drop} "
            f"({stats.drop_reasons}); "
            "nothing is left to score or shard: loosen the filters (languages, min_language_score, filter_overrides)"
        )
    return finish_stage_asset(context, wandb, stats, out_dir, config)


@curation_asset("quality_classifier", partitions_def=None, automation=False, deps=[raw_documents], kinds=["fasttext"])
def quality_classifier(
    context: dg.AssetExecutionContext, config: QualityClassifierConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """A fastText classifier of edited text against junk: trained on reference documents of several domains
    (or the given positives) against junk made from their vocabulary (and any given negatives), never on the
    corpus being curated; held-out precision, recall, F1, ROC-AUC, and transfer leave-one-domain-out."""
    out_dir = paths.stage_dir("quality_classifier")
    reference = ReferenceConfig(domains=tuple(config.reference_domains), max_per_domain=config.max_per_domain,
                                seed=config.seed)  # fmt: skip
    model_config = to_stage(config, QualityModelConfig, reference=reference)
    metrics = train_quality_classifier(
        list(config.negatives), out_dir, list(config.positives) or None, model_config, log=context.log
    )
    summary = {k: v for k, v in dataclasses.asdict(metrics).items() if k not in ("positives_by_domain", "transfer")}
    rows = [(t["domain"], t["n_real"], t["roc_auc"], f"{t['real_kept']:.0%}", f"{t['junk_kept']:.0%}")
            for t in metrics.transfer]  # fmt: skip
    columns = ("held-out domain", "documents", "ROC-AUC", "real kept", "junk kept")
    if rows:
        summary["transfer_min_roc_auc"] = min(t["roc_auc"] for t in metrics.transfer)
        summary["transfer_min_real_kept"] = min(t["real_kept"] for t in metrics.transfer)
        summary["transfer_max_junk_kept"] = max(t["junk_kept"] for t in metrics.transfer)
    tables = {"transfer": (columns, rows)} if rows else {}
    run_dir = wandb.log_run(context, "quality_classifier", summary, tables=tables, config=config.model_dump())
    metadata = {**summary, "model_path": dg.MetadataValue.path(str(out_dir / MODEL_FILE))}
    metadata["positives_by_domain"] = text_table(("domain", "documents"), list(metrics.positives_by_domain.items()))
    if rows:
        metadata["transfer"] = dg.MetadataValue.md(
            f"Leave one domain out, kept at quality_score >= {model_config.transfer_threshold}:\n\n"
            + md_table(columns, rows)
        )
    if config.positives:
        drops = context.instance.get_dynamic_partitions(DROPS.name)
        raw = [t for f in paths.partition_files("raw_documents", DOCUMENTS_FILE, drops)
               for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]  # fmt: skip
        share = resemblance(config.positives, raw)
        metadata["positives_in_corpus"] = share
        if share > 0.2:
            metadata["warning"] = (
                f"{share:.0%} of the positives are documents of raw_documents itself: quality_score then measures "
                "resemblance to this corpus, not quality"
            )
            context.log.warning(metadata["warning"])
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


def score_plots(out_dir: Path, filtered: Path) -> tuple[Path, Path, dict[str, int]]:
    """A histogram of all scores and one of the scores per source (PNG files in out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = pq.read_table(out_dir / "scores.parquet")["quality_score"].to_numpy()
    edges = np.linspace(0, 1, 11)
    counts, _ = np.histogram(scores, bins=edges)
    histogram = {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(c) for i, c in enumerate(counts)}
    hist_png = bar_chart_png(histogram, out_dir / "score_histogram.png", "Quality scores", "quality_score", "documents")

    docs = pq.read_table(out_dir / SCORES_FILE)
    inputs = pq.read_table(filtered, columns=["id", "source"])
    sources = dict(zip(inputs["id"].to_pylist(), inputs["source"].to_pylist()))
    by_source: dict[str, list[float]] = {}
    for doc_id, score in zip(docs["id"].to_pylist(), docs["quality_score"].to_pylist()):
        by_source.setdefault(sources.get(doc_id, "?"), []).append(score)
    fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=100)
    for source, values in sorted(by_source.items()):
        ax.hist(values, bins=edges, histtype="step", linewidth=1.5, label=f"{source} ({len(values)})")
    ax.set(title="Quality score per source", xlabel="quality_score", ylabel="documents")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    per_source_png = out_dir / "score_by_source.png"
    with atomic_file(per_source_png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return hist_png, per_source_png, histogram


@curation_asset("scored_documents", deps=[filtered_documents, quality_classifier])
def scored_documents(
    context: dg.AssetExecutionContext, config: ScoredDocumentsConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """Every filtered document with its quality_score (P(reference quality)); the best are kept."""
    drop = context.partition_key
    out_dir = paths.partition_dir("scored_documents", drop)
    stage = to_stage(config, ScoreConfig)
    [filtered] = drop_input(paths, "filtered_documents", drop)
    stats = score_documents(
        [filtered], out_dir, paths.stage_dir("quality_classifier") / MODEL_FILE, stage, log=context.log
    )
    hist_png, per_source_png, histogram = score_plots(out_dir, Path(filtered))
    extra = {
        "score_distribution": dg.MetadataValue.md(
            sparkline_md(list(histogram.values()), "quality scores", log=True)
            + " documents by quality_score, 0 to 1 in tenths (log scale)"
        ),
        "score_histogram": dg.MetadataValue.md(
            md_table(("quality_score", "documents"), list(histogram.items())) + "\n\n" + png_md(hist_png, "scores")
        ),
        "score_by_source": dg.MetadataValue.md(png_md(per_source_png, "scores per source")),
        "cutoff": stats.extra["threshold"],
        "scores_path": dg.MetadataValue.path(str(out_dir / SCORES_FILE)),
    }
    images = {"score_histogram": hist_png, "score_by_source": per_source_png}
    return finish_stage_asset(context, wandb, stats, out_dir, config, extra, images)


def bucket_examples(shard_dir: Path, n: int = 2, chars: int = 120) -> list[tuple]:
    """Per bucket: its top and bottom documents by quality_score."""
    rows = []
    for shard in sorted(shard_dir.glob("shard-*.parquet")):
        rows += pq.read_table(shard, columns=["id", "text", "quality_score", "bucket"]).to_pylist()
    out = []
    for bucket in sorted({r["bucket"] for r in rows}):
        members = sorted((r for r in rows if r["bucket"] == bucket), key=lambda r: (-r["quality_score"], r["id"]))
        for which, picked in (("top", members[:n]), ("bottom", members[-n:])):
            out += [(bucket, which, r["id"], f"{r['quality_score']:.3f}", r["text"][:chars]) for r in picked]
    return out


@curation_asset("curriculum_shards", partitions_def=None, deps=[scored_documents])
def curriculum_shards(
    context: dg.AssetExecutionContext, config: CurriculumShardsConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """Scored documents bucketed by quality tier x difficulty tier, written in curriculum order as zstd
    Parquet shards with manifest.json (rows, bytes, sha256 per shard, bucket counts, config, code version)."""
    out_dir = paths.stage_dir("curriculum_shards")
    stage = to_stage(config, CurriculumConfig)
    drops = context.instance.get_dynamic_partitions(DROPS.name)
    inputs = [str(f) for f in paths.partition_files("scored_documents", DOCUMENTS_FILE, drops)]
    if not inputs:
        raise ValueError(f"curriculum_shards: no drop of scored_documents is materialized (drops: {drops})")
    context.log.info(f"curriculum_shards: the scored documents of {len(inputs)} drops")
    version = build_curriculum_version(inputs, out_dir, stage, log=context.log)
    stats = version.stats
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    columns = (
        "bucket",
        "quality_tier",
        "difficulty_tier",
        "rows",
        "quality_min",
        "quality_max",
        "difficulty_min",
        "difficulty_max",
    )
    bucket_rows = [tuple(b[c] for c in columns) for b in manifest["buckets"]]
    examples = bucket_examples(version.folder)
    run_dir = wandb.log_run(
        context,
        "curation",
        {"n_rows": manifest["n_rows"], "n_shards": len(manifest["shards"])},
        tables={
            "buckets": (columns, bucket_rows),
            "bucket_examples": (("bucket", "end", "id", "score", "text"), examples),
        },
        config=config.model_dump(),
    )
    metadata = {
        "dagster/row_count": manifest["n_rows"],
        "dagster/column_schema": column_schema(SHARD_SCHEMA),
        "n_shards": len(manifest["shards"]),
        "mb": round(sum(s["bytes"] for s in manifest["shards"]) / 1e6, 3),
        "buckets": dg.MetadataValue.md(md_table(columns, bucket_rows)),
        "bucket_examples": text_table(("bucket", "end", "id", "score", "text"), examples),
        "manifest": dg.MetadataValue.path(str(out_dir / MANIFEST_FILE)),
        "version": version.number,
        "new_version": version.new,
        "version_dir": dg.MetadataValue.path(str(version.folder)),
        "n_drops": len(inputs),
        "code_version": manifest["code_version"],
        "seconds": stats.seconds,
    }
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)
