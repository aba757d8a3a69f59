"""Training assets: the byte-level BPE tokenizer, and the MoE and dense-baseline models trained with
DeepSpeed in a subprocess (torchrun for several ranks) through Dagster Pipes.

The training process streams its progress lines into the Dagster event log and reports its final
metrics; the asset adds the loss curve and a summary table. A run that failed or was terminated
(Dagster sends SIGTERM, the ranks checkpoint) resumes from its last checkpoint when materialized again
with the same config; a failure shows the tail of each rank's log.
"""

import dataclasses
import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.config import stage_config, to_stage
from assets.metadata import md_table, png_md, rounded, sparkline_md, text_table
from assets.quality import curriculum_shards
from assets.resources import CurationPaths, WandbResource
from model.io import write_text_atomic
from model.tokenizer import (
    TOKENIZER_FILE,
    TokenizerConfig,
    TokenizerStats,
    iter_texts,
    load_tokenizer,
    shard_paths,
    train_tokenizer,
)
from pipelines.curriculum import MANIFEST_FILE
from training.config import PRESETS, TrainConfig
from training.launch import (
    SUMMARY_FILE,
    check_inputs,
    continuation_start,
    launch_command,
    prepare_run_dir,
    rank_log_tails,
)
from training.metrics import read_metrics

GROUP = "training"
TRAINING_TAGS = {"frugal/compute": "training"}
"""Training runs use every core: Definitions' executor runs one op with this tag at a time (benchmark_report and
exported_model carry it too, so that no export shares the cores with the benchmark's timings)."""


TokenizerAssetConfig = stage_config(
    TokenizerConfig,
    "TokenizerAssetConfig",
    doc="Byte-level BPE training; an existing tokenizer made with the same settings is kept unless `retrain`.",
    exclude=("special_tokens",),  # bos, eos, pad: the ids every model of the project is built around
    retrain=(bool, Field(default=False, description="Train again even though a tokenizer made with these settings "
             "exists (by default it is kept when the shards gain a drop, so the models trained with it stay valid).")),
)  # fmt: skip
TRAINED_WITH_FILE = "trained_with.json"
"""Beside tokenizer.json: the settings and the curriculum_shards version it was trained with."""


@dg.asset(group_name=GROUP, kinds={"huggingface"}, deps=[curriculum_shards])
def tokenizer(
    context: dg.AssetExecutionContext, config: TokenizerAssetConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """A byte-level BPE (Hugging Face tokenizers) trained on curriculum_shards: tokenizer.json. It is not retrained
    when the shards change (new drops), so the models trained with it stay valid, unless `retrain` asks for it or
    its settings change."""
    shard_dir = paths.stage_dir("curriculum_shards")
    out_dir = paths.stage_dir("tokenizer")
    settings = to_stage(config, TokenizerConfig)
    wanted = {"config": config.model_dump(exclude={"retrain"})}
    record = out_dir / TRAINED_WITH_FILE
    previous = json.loads(record.read_text()) if record.exists() and (out_dir / TOKENIZER_FILE).exists() else None
    shards_version = json.loads((shard_dir / MANIFEST_FILE).read_text()).get("version")
    if previous is not None and previous["config"] == wanted["config"] and not config.retrain:
        context.log.info(f"tokenizer: kept, trained on curriculum_shards version {previous['shards_version']} "
                         f"(shards now at version {shards_version}); retrain=true trains again")  # fmt: skip
        stats = TokenizerStats(**previous["stats"])
        retrained = False
    else:
        stats = train_tokenizer(shard_dir, out_dir, settings)
        previous = {**wanted, "shards_version": shards_version, "stats": dataclasses.asdict(stats)}
        write_text_atomic(record, json.dumps(previous, indent=2) + "\n")
        retrained = True
    context.log.info(f"tokenizer: {stats}")
    tok = load_tokenizer(out_dir / TOKENIZER_FILE)
    sample = next(iter_texts(shard_paths(shard_dir)))[:200]
    pieces = tok.encode(sample).tokens[:40]
    summary = {
        "vocab_size": stats.vocab_size,
        "chars_per_token": stats.chars_per_token,
        "n_documents": stats.n_documents,
        "seconds": stats.seconds,
        "retrained": retrained,
        "trained_on_shards_version": previous["shards_version"] or 0,
    }
    run_dir = wandb.log_run(context, "tokenizer", summary, config=config.model_dump())
    metadata = {
        **summary,
        "example": text_table(("text", "tokens"), [(sample[:120], " · ".join(pieces))]),
        "path": dg.MetadataValue.path(str(out_dir / TOKENIZER_FILE)),
    }
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(asset=tokenizer, description="Shard texts encode and decode back exactly.")
def tokenizer_round_trips(paths: CurationPaths) -> dg.AssetCheckResult:
    tok = load_tokenizer(paths.stage_dir("tokenizer") / TOKENIZER_FILE)
    texts = [t for t, _ in zip(iter_texts(shard_paths(paths.stage_dir("curriculum_shards"))), range(200))]
    failures = [t[:80] for t in texts if tok.decode(tok.encode(t).ids, skip_special_tokens=False) != t]
    return dg.AssetCheckResult(
        passed=not failures,
        metadata={
            "n_checked": len(texts),
            "failures": text_table(("text (first 80 characters)",), [(f,) for f in failures]),
        },
    )


TRAIN_FIELDS = ("max_steps", "lr", "warmup_steps", "world_size", "ep_size", "zero_stage", "precision",
                "checkpoint_every", "eval_every", "price_per_device_hour", "seed")  # fmt: skip
"""The fields of training.config.TrainConfig that a training asset's run config sets (the rest keep their defaults)."""

DATA_SCHEDULES = ("random", "quality_anneal", "curriculum")
DEFAULT_DATA_SCHEDULE = "random"
DEFAULT_LR_SCHEDULE = "wsd"
"""What the data-schedule ablation (issue 20, `make bench-ablation`: bench/results/ablation/) measured best."""


def data_stream(schedule: str, decay_fraction: float, bucket_schedule: list[int] | None) -> dict:
    """The training.config.DataConfig fields of a training asset's data_schedule."""
    if schedule not in DATA_SCHEDULES:
        raise ValueError(f"data_schedule must be one of {DATA_SCHEDULES}, not {schedule!r}")
    if bucket_schedule is not None and schedule != "curriculum":
        raise ValueError(f"bucket_schedule={bucket_schedule} orders the curriculum: set data_schedule to curriculum")
    if schedule == "curriculum":
        return {"bucket_schedule": bucket_schedule}
    if schedule == "random":
        return {"mix_schedule": [{"until": 1.0}]}
    return {"mix_schedule": [{"until": 1.0 - decay_fraction}, {"until": 1.0, "quality_tiers": [-1]}]}


TrainAssetConfig = stage_config(
    TrainConfig,
    "TrainAssetConfig",
    doc="A training run: the main knobs of training.config.TrainConfig (the rest keep their defaults), the model "
    "preset and the data stream.",
    include=TRAIN_FIELDS,
    preset=(str, Field(default="small_cpu", description=f"Model preset: {', '.join(PRESETS)}.")),
    batch_size=(int, Field(default=8, description="Global batch (sequences per step over all ranks).")),
    seq_len=(int, Field(default=128, description="Tokens per training sequence (the demo's 128; training.config's "
                        "DataConfig defaults to 256 for longer runs).")),
    data_schedule=(str, Field(default=DEFAULT_DATA_SCHEDULE, description="How the curated buckets are read: random "
                   "(every document once, in a uniformly random order), quality_anneal (random, then only the top "
                   "quality tier over the last decay_fraction of the steps) or curriculum (bucket by bucket, in "
                   "bucket_schedule's order). The default is what bench/ablation.py measured best.")),
    bucket_schedule=(list[int] | None, Field(default=None, description="data_schedule curriculum: the buckets in "
                     "reading order, e.g. [0, 1, 2]; unset = every bucket in manifest order.")),
    lr_schedule=(str, Field(default=DEFAULT_LR_SCHEDULE, description="After the warmup: cosine, or wsd (constant, then "
                 "a decay over the last decay_fraction of the steps).")),
    decay_fraction=(float, Field(default=0.2, description="wsd and quality_anneal: the share of the steps the decay "
                    "takes, in (0, 1).")),
    decay_shape=(str, Field(default="1-sqrt", description="wsd: linear or 1-sqrt.")),
    top_p=(float | None, Field(default=None, description="Dynamic routing (MoE only); unset = fixed top-k.")),
    bias_update_rate=(float | None, Field(default=None, description="Balancing step gamma (MoE only); unset = the "
                      "preset's.")),
    capacity_factor=(float | None, Field(default=None, description="Expert capacity factor (MoE only); unset = the "
                     "preset's.")),
    mtp_depth=(int | None, Field(default=None, description="Multi-token-prediction modules trained with the MoE "
               "(DeepSeek-V3; they are its speculative proposer when served); unset = the preset's (none); 0 = none. "
               "The dense models ignore it.")),
    mtp_distill_weight=(float, Field(default=0.5, description="With MTP modules: the share of their loss that is the "
                        "KL to the main head's distribution (training.config.TrainConfig.mtp_distill_weight; 0 = "
                        "DeepSeek-V3's plain cross-entropy).")),
    continue_from_last=(bool, Field(default=False, description="Start from the weights of this asset's last "
                        "finished run instead of random ones, e.g. to continue training on shards that gained drops "
                        "(training.config.TrainConfig.init_from); max_steps more steps, a fresh schedule.")),
)  # fmt: skip


def train_config(
    config: TrainAssetConfig, paths: CurationPaths, name: str, dense: bool, init_from: str | None = None
) -> TrainConfig:
    model: dict = {"preset": config.preset, "dense_baseline": dense}
    for key in ("top_p", "bias_update_rate", "capacity_factor", "mtp_depth"):
        value = getattr(config, key)
        if value is not None and not dense:
            model[key] = value
    cfg = {
        "name": name,
        "model": model,
        "data": {
            "seq_len": config.seq_len,
            "batch_size": config.batch_size,
            **data_stream(config.data_schedule, config.decay_fraction, config.bucket_schedule),
        },
        "lr_schedule": config.lr_schedule,
        "decay_fraction": config.decay_fraction,
        "decay_shape": config.decay_shape,
        "shard_dir": str(paths.stage_dir("curriculum_shards")),
        "tokenizer_path": str(paths.stage_dir("tokenizer") / TOKENIZER_FILE),
        "run_dir": str(paths.stage_dir(name)),
        **{k: getattr(config, k) for k in TRAIN_FIELDS},
        "ep_size": 1 if dense else config.ep_size,
        "init_from": init_from,
    }
    if not dense and model.get("mtp_depth"):
        cfg["mtp_distill_weight"] = config.mtp_distill_weight
    if getattr(config, "distill_weight", 0):
        cfg |= {"distill_from": str(paths.stage_dir("moe_model")), "distill_weight": config.distill_weight}
    return TrainConfig.from_dict(cfg)


def train_model(
    context: dg.AssetExecutionContext,
    config: TrainAssetConfig,
    paths: CurationPaths,
    wandb: WandbResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
    dense: bool,
) -> dg.MaterializeResult:
    name = context.asset_key.to_user_string()
    try:
        init_from = str(continuation_start(paths.stage_dir(name))) if config.continue_from_last else None
        cfg = train_config(config, paths, name, dense, init_from)
        check_inputs(cfg)
    except ValueError as e:
        raise dg.Failure(description=f"{name}: {e}") from e
    resumed = prepare_run_dir(cfg)
    context.log.info(
        f"{'resuming' if resumed else 'starting'} {name}: {cfg.model.total_params():,} parameters "
        f"({cfg.model.active_params():,} active), {cfg.world_size} rank(s), run folder {cfg.run_dir}"
    )
    env = wandb.process_env(context)
    try:
        reported = pipes_subprocess_client.run(
            command=launch_command(cfg), context=context, env=env
        ).get_materialize_result()
    except Exception as e:  # the process failed or was terminated: show why, from the ranks' own logs
        tails = rank_log_tails(cfg.run_dir)
        context.log.error(tails)
        raise dg.Failure(
            description=f"{name}: training failed ({type(e).__name__}); materialize again to resume from the last "
            f"checkpoint. Rank logs:\n{tails}",
            metadata={"rank_logs": dg.MetadataValue.text(tails), "run_dir": dg.MetadataValue.path(cfg.run_dir)},
        ) from e
    run_dir = Path(cfg.run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    reported_metadata = {k: rounded(v) for k, v in reported.metadata.items()}
    # the summary's figures that the metadata above does not already list
    rows = [
        (k, f"{v:.4g}" if isinstance(v, float) else v)
        for k, v in summary.items()
        if v is not None and k not in reported_metadata
    ]
    shards = json.loads((Path(cfg.shard_dir) / MANIFEST_FILE).read_text())
    losses = [r["loss"] for r in read_metrics(run_dir)]
    metadata = {
        "loss": dg.MetadataValue.md(
            sparkline_md(losses, "training loss", kind="line")
            + f" training loss, step 1 to {len(losses)}: {losses[0]:.3f} to {losses[-1]:.3f}"
        ),
        "loss_curve": dg.MetadataValue.md(png_md(run_dir / "loss_curve.png", f"{name} loss")),
        **reported_metadata,
        "resumed": resumed,
        "continued_from": dg.MetadataValue.path(cfg.init_from) if cfg.init_from else "none (random weights)",
        "shards_version": shards.get("version", 0),
        "run_dir": dg.MetadataValue.path(str(run_dir)),
    }
    if rows:
        metadata["summary"] = dg.MetadataValue.md(md_table(("metric", "value"), rows))
    return dg.MaterializeResult(metadata=metadata)


class DraftAssetConfig(TrainAssetConfig):
    preset: str = "small_cpu_draft"
    """A small dense model with the target's vocabulary (small_cpu_draft, or debug_tiny_draft for tests)."""
    distill_weight: float = 0.5
    """Share of the loss that is the KL divergence to moe_model's next-token distribution (distillation,
    which raises the draft's acceptance rate); 0 = trained on the data alone."""


def _training_asset(name: str, config_type: type[TrainAssetConfig], dense: bool, description: str, deps=()):
    """One model trained by `train_model`; the three training assets differ only in these arguments."""

    @dg.asset(
        name=name,
        description=description,
        group_name=GROUP,
        kinds={"deepspeed", "pytorch"},
        deps=[curriculum_shards, tokenizer, *deps],
        op_tags=TRAINING_TAGS,
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: config_type,
        paths: CurationPaths,
        wandb: WandbResource,
        pipes_subprocess_client: dg.PipesSubprocessClient,
    ) -> dg.MaterializeResult:
        return train_model(context, config, paths, wandb, pipes_subprocess_client, dense=dense)

    return _asset


moe_model = _training_asset(
    "moe_model",
    TrainAssetConfig,
    dense=False,
    description="The DeepSeekMoE model (shared + fine-grained routed experts on DeepSpeed's MoE layer) trained "
    "on curriculum_shards: model.safetensors, config.json, tokenizer.json, metrics.jsonl, checkpoints.",
)
dense_baseline_model = _training_asset(
    "dense_baseline_model",
    TrainAssetConfig,
    dense=True,
    description="The dense baseline: the same model with dense feed-forwards of equal active parameters per "
    "token, trained on the same tokens.",
)
draft_model = _training_asset(
    "draft_model",
    DraftAssetConfig,
    dense=True,
    description="The speculative-decoding draft: a small dense model trained on the same shards and tokens "
    "with the same tokenizer (inference.runtime.speculative checks that the tokenizers are identical), distilled from "
    "moe_model's next-token distributions.",
    deps=[moe_model],
)


def _reload_check(asset) -> dg.AssetChecksDefinition:
    name = asset.key.to_user_string()

    @dg.asset_check(
        asset=asset,
        name="exported_model_reproduces_validation_loss",
        description="model.safetensors, loaded into the plain-torch model, gives the validation loss the "
        "DeepSpeed run reported (first curriculum bucket).",
    )
    def check(paths: CurationPaths) -> dg.AssetCheckResult:
        run_dir = paths.stage_dir(name)
        reported = json.loads((run_dir / SUMMARY_FILE).read_text())
        loss, bucket = reload_validation_loss(run_dir)
        expected = reported[f"val_loss/bucket{bucket}"]
        return dg.AssetCheckResult(
            passed=abs(loss - expected) <= 1e-3 * abs(expected),
            metadata={"bucket": bucket, "reloaded_val_loss": loss, "reported_val_loss": expected},
        )

    return check


def reload_validation_loss(run_dir: Path) -> tuple[float, int]:
    """Validation loss of the exported model on the first bucket's held-out rows, as training built them."""
    import torch
    import torch.nn.functional as F

    from model.io import load_model
    from training.data import run_validation_rows

    model = load_model(run_dir)
    bucket, batch = next(iter(run_validation_rows(run_dir).items()))
    with torch.no_grad():
        total = sum(
            F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
            for b in batch.split(8)
        )
    return total / batch[:, 1:].numel(), bucket


TRAINING_CHECKS = [
    tokenizer_round_trips,
    _reload_check(moe_model),
    _reload_check(dense_baseline_model),
    _reload_check(draft_model),
]
