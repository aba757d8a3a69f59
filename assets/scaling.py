"""The dense_scaling asset: the dense model of the MoE model's quality, and what the MoE saves against it.

Dense models of several sizes are trained with moe_model's data, token budget, seed and schedule; held-out loss
is fitted against parameters, and the size that matches the MoE's loss (the dense-equivalent multiplier) is
trained as `equal_quality_dense`, the baseline benchmark_report measures costs against (training.scaling
explains the method). Each training is a `python -m training.train` process started by
training.scaling.run_scaling in this step's process; its progress lines go to the Dagster event log.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.metadata import md_table, png_md
from assets.resources import CurationPaths, WandbResource
from assets.training import TRAINING_TAGS, moe_model
from training.scaling import (
    EQUAL_QUALITY,
    PLOT_FILE,
    RESULTS_FILE,
    TABLE_COLUMNS,
    ScalingConfig,
    run_scaling,
    table_rows,
)

GROUP = "evaluation"


class DenseScalingConfig(dg.Config):
    """The sizes and seeds of training.scaling.ScalingConfig (the runs copy moe_model's own config)."""

    d_ff: list[int] | None = None
    """Feed-forward widths of the dense sizes; unset = the equal-active twin's width times `multipliers`."""
    multipliers: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    noise_size: int | None = 1
    """Index into the sizes of the one trained again with `noise_seeds` (the seed noise); unset = every size is,
    and the fit reads each size's mean over its seeds."""
    noise_seeds: list[int] = Field(default_factory=lambda: [1])
    noise_sigmas: float = 2.0
    round_to: int = 64
    max_steps: int | None = None
    """Override of moe_model's steps (tests only: the study is meant at the MoE's token budget)."""
    target_loss: float | None = None
    """A held-out loss to match instead of moe_model's (a quality target); unset = moe_model's."""


@dg.asset(
    group_name=GROUP,
    kinds={"deepspeed", "pytorch"},
    deps=[moe_model],
    op_tags=TRAINING_TAGS,
    description="Dense models of 4+ sizes (and a second seed) trained like moe_model; held-out loss fitted against "
    "parameters; the dense-equivalent multiplier; and equal_quality_dense, the dense model of the MoE's quality "
    "that benchmark_report's cost waterfall starts from.",
)
def dense_scaling(
    context: dg.AssetExecutionContext, config: DenseScalingConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    cfg = ScalingConfig(moe_run=str(paths.stage_dir("moe_model")), out_dir=str(paths.stage_dir("dense_scaling")),
                        **config.model_dump())  # fmt: skip
    try:
        cfg.check()
    except ValueError as e:
        raise dg.Failure(description=f"dense_scaling: {e}") from e
    env = wandb.process_env(context)
    try:
        results = run_scaling(cfg, env, progress=context.log.info)
    except RuntimeError as e:  # a training process failed: its log tail says why
        raise dg.Failure(description=f"dense_scaling: {e}") from e
    out = Path(cfg.out_dir)
    table = md_table(TABLE_COLUMNS, table_rows(results))
    fit = results["fit"]
    summary = {"seed_noise": results["seed_noise"], "fit_b": fit["b"], "fit_rms_residual": fit["rms_residual"],
               "moe_val_loss": results["moe"]["val_loss"], "bracketed": int(results["bracketed"])}  # fmt: skip
    metadata: dict = {
        "table": dg.MetadataValue.md(table),
        "scaling": dg.MetadataValue.md(png_md(out / PLOT_FILE, "held-out loss against parameters")),
        "seed_noise": results["seed_noise"],
        "fit": dg.MetadataValue.json(fit),
        "covered_loss": dg.MetadataValue.json(results["covered_loss"]),
        "results": dg.MetadataValue.path(str(out / RESULTS_FILE)),
    }
    if results["bracketed"]:
        eq = results["equal_quality"]
        summary |= {
            "multiplier": eq["multiplier"],
            "equal_quality_val_loss": eq["val_loss"],
            "matched": int(eq["matched"]),
        }
        metadata |= {
            "multiplier": eq["multiplier"],
            "multiplier_with_embeddings": eq["multiplier_with_embeddings"],
            f"{EQUAL_QUALITY}/d_ff": eq["d_ff"],
            f"{EQUAL_QUALITY}/val_loss": eq["val_loss"],
            f"{EQUAL_QUALITY}/matched": eq["matched"],
            f"{EQUAL_QUALITY}/run_dir": dg.MetadataValue.path(eq["run_dir"]),
        }
    else:  # evidence, never a failure: benchmark_report then starts from the equal-active twin and says why
        metadata |= {"equal_quality": "not established", "reason": results["reason"],
                     "to_establish": results["to_establish"]}  # fmt: skip
        context.log.warning(f"equal quality not established: {results['reason']}")
    run_dir = wandb.log_run(context, "scaling", summary, tables={"scaling": (TABLE_COLUMNS, table_rows(results))},
                            images={"scaling": out / PLOT_FILE}, config=results["config"])  # fmt: skip
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=dense_scaling,
    description="The study found a dense model of the MoE's quality: the sizes bracket the MoE's held-out loss, loss "
    "falls with size, and equal_quality_dense lands within the seed noise. A warning, never a block: without it "
    "benchmark_report starts from the MoE's equal-active dense twin and says so.",
)
def equal_quality_established(paths: CurationPaths) -> dg.AssetCheckResult:
    import json

    results = json.loads((paths.stage_dir("dense_scaling") / RESULTS_FILE).read_text())
    low, high = results["covered_loss"]
    metadata = {
        "moe_val_loss": results["moe"]["val_loss"],
        "covered_loss": f"{low:.4f} to {high:.4f}",
        "loss_falls_with_size": results["fit"]["b"] < 0,
        "seed_noise": results["seed_noise"],
        "losses": dg.MetadataValue.json({p["name"]: p["val_loss"] for p in results["points"]}),
    }
    if not results["bracketed"]:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"equal quality not established: {results['reason']}",
            metadata=metadata | {"to_establish": results["to_establish"]},
        )
    eq = results["equal_quality"]
    metadata |= {"multiplier": eq["multiplier"], "loss_gap": eq["loss_gap"], "tolerance": results["tolerance"]}
    matched = bool(eq["matched"])
    return dg.AssetCheckResult(
        passed=matched,
        severity=dg.AssetCheckSeverity.WARN,
        description=None if matched else f"{EQUAL_QUALITY} missed the MoE's loss by {eq['loss_gap']:+.4f}, outside "
        f"the seed noise ({results['tolerance']:.4f}): benchmark_report interpolates row 1 between the sizes around it",
        metadata=metadata,
    )


SCALING_CHECKS = [equal_quality_established]
