"""The data_ablation asset: what curation and the data schedule buy, measured. The same model is trained with the
same seeds and token budget on five arms: raw documents (exact dedup only); the curated shards in random order with a
cosine learning rate, with warmup-stable-decay (WSD), with WSD and a quality anneal (only the top quality tier during
the decay); and in curriculum order. All are evaluated on one shared held-out set (training.ablation explains the
method and why the held-out set is fair to raw).

Each training is its own `python -m training.train` process (DeepSpeed), started one after the other by
training.ablation.run_ablation in this step's process, so the asset needs no Pipes session of its own;
its progress lines go to the Dagster event log.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.curation import clean_documents
from assets.metadata import md_table, png_md
from assets.quality import curriculum_shards
from assets.resources import CurationPaths, WandbResource
from assets.training import TRAINING_TAGS, tokenizer
from model.tokenizer import TOKENIZER_FILE
from pipelines.dedup_index import PARTITIONS_DIR
from pipelines.near_dedup import CLUSTERS_FILE
from training.ablation import (
    ARMS,
    PAIRED_COLUMNS,
    PLOT_FILE,
    TABLE_COLUMNS,
    AblationConfig,
    paired_rows,
    run_ablation,
    table_rows,
)

GROUP = "evaluation"


class AblationAssetConfig(dg.Config):
    """The budget knobs of training.ablation.AblationConfig (the rest keep their defaults)."""

    preset: str = "debug_tiny"
    """Model preset (vocab_size follows the tokenizer): debug_tiny on CPU, small_cpu or moe_1b on GPU."""
    arms: list[str] = Field(default_factory=lambda: list(ARMS))
    """The arms trained (training.ablation.ARMS; raw is always one)."""
    tokens: int = 262_144
    """Training tokens per run, the same for every arm."""
    seq_len: int = 64
    batch_size: int = 16
    eval_every_tokens: int = 16_384
    warmup_tokens: int = 16_384
    decay_fraction: float = 0.2
    """The WSD arms' decay (and the quality anneal's) share of the run, in (0, 1)."""
    decay_shape: str = "1-sqrt"
    lr: float = 3e-3
    seeds: list[int] = Field(default_factory=lambda: [0])
    data_seed: int = 0
    heldout_fraction: float = 0.1
    heldout_tokens: int = 16_384
    threads: int | None = None
    price_per_device_hour: float = 0.05


def ablation_config(
    config: AblationAssetConfig, paths: CurationPaths, wandb: WandbResource, run_id: str
) -> AblationConfig:
    drops = paths.stage_dir("near_dedup_documents") / PARTITIONS_DIR
    return AblationConfig(
        clean_documents=str(paths.stage_dir("clean_documents") / PARTITIONS_DIR / "*" / "documents.parquet"),
        curriculum_shards=str(paths.stage_dir("curriculum_shards")),
        tokenizer_path=str(paths.stage_dir("tokenizer") / TOKENIZER_FILE),
        near_duplicate_clusters=str(drops / "*" / CLUSTERS_FILE) if any(drops.glob(f"*/{CLUSTERS_FILE}")) else None,
        out_dir=str(paths.stage_dir("data_ablation")),
        wandb_project=wandb.project,
        wandb_mode=wandb._mode(),
        wandb_dir=wandb.dir,
        group=f"data-ablation-{run_id[:8]}",
        **config.model_dump(),
    )


@dg.asset(
    group_name=GROUP,
    kinds={"deepspeed", "pytorch"},
    deps=[clean_documents, curriculum_shards, tokenizer],
    op_tags=TRAINING_TAGS,
)
def data_ablation(
    context: dg.AssetExecutionContext, config: AblationAssetConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """Held-out loss against tokens for every arm; the tokens, device-hours and $ each needs to reach (a)'s final
    loss, paired by seed; the best curated schedule and whether it beats random order beyond the seed spread; the share
    of raw tokens curation removed and the compute that saved."""
    try:
        cfg = ablation_config(config, paths, wandb, context.run_id)
        cfg.check()
    except ValueError as e:
        raise dg.Failure(description=f"data_ablation: {e}") from e
    try:
        results = run_ablation(cfg, progress=context.log.info)
    except RuntimeError as e:  # a training process failed: its log tail says why
        raise dg.Failure(description=f"data_ablation: {e}") from e
    out = Path(cfg.out_dir)
    metadata: dict = {
        "table": dg.MetadataValue.md(md_table(TABLE_COLUMNS, table_rows(results))),
        "paired": dg.MetadataValue.md(md_table(PAIRED_COLUMNS, paired_rows(results))),
        "heldout_loss": dg.MetadataValue.md(png_md(out / PLOT_FILE, "held-out loss against tokens")),
        "target_heldout_loss": results["target_heldout_loss"],
        "best": results["best"] or "none",
        **{f"target/{k}": v for k, v in results["targets"].items()},
        "removed_token_share": results["curation"]["removed_share"],
        "epoch_device_hours_saved": results["curation"]["epoch_device_hours_saved"],
        "epoch_usd_saved": results["curation"]["epoch_usd_saved"],
        "heldout_documents": results["heldout"]["documents"],
        "wandb_group": results["wandb_group"],
        "wandb_runs": dg.MetadataValue.json({k: v for k, v in results["wandb_runs"].items() if v}),
        "results": dg.MetadataValue.path(str(out / "results.json")),
    }
    for run in results["runs"]:
        metadata[f"{run}/final_heldout_loss"] = results["runs"][run]["final_heldout_loss"]
        t = results["to_target"][run]
        metadata[f"{run}/tokens_to_target"] = t["tokens"] if t["reached"] else "not reached"
        if t["reached"]:
            metadata[f"{run}/share_of_raw_tokens"] = t["share_of_raw_tokens"]
            metadata[f"{run}/device_hours_to_target"] = t["device_hours"]
            metadata[f"{run}/usd_to_target"] = t["spend_usd"]
    return dg.MaterializeResult(metadata=metadata)
