"""Inference assets: quantized_model (INT8 and INT4 target and draft, per-channel KV scales, and what
quantization costs in validation perplexity)."""

import json
from pathlib import Path

import dagster as dg

from assets.metadata import md_table
from assets.resources import CurationPaths, WandbResource
from assets.training import draft_model, moe_model
from model.io import WEIGHTS_FILE

GROUP = "inference"


class QuantizedModelConfig(dg.Config):
    """How the target and draft are quantized (inference.quantized_model.QuantizeOptions)."""

    group_size: int = 64
    """INT4 group size: 32, 64 or 128 (must divide every matrix's input width)."""
    symmetric: bool = False
    awq: bool = True
    """Activation-aware scaling for INT4, calibrated on training rows."""
    calibration_rows: int = 32
    val_rows: int = 64
    """Held-out rows (of the run's seq_len + 1 tokens) the perplexities are measured on."""


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "safetensors"},
    deps=[moe_model, draft_model],
    description="moe_model and draft_model quantized to INT8 (per channel) and INT4 (group-wise, AWQ), saved as "
    "safetensors under int8/ and int4/ {target,draft}, with per-channel KV-cache scales; reports the validation "
    "perplexity of every weight and KV-cache format against fp32.",
)
def quantized_model(
    context: dg.AssetExecutionContext, config: QuantizedModelConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    from inference.quantized_model import QuantizeOptions, build
    from training.train import run_training_rows, run_validation_rows

    options = QuantizeOptions(
        group_size=config.group_size,
        symmetric=config.symmetric,
        awq=config.awq,
        calibration_rows=config.calibration_rows,
        val_rows=config.val_rows,
    )
    try:
        options.config("int4").check()
    except ValueError as e:
        raise dg.Failure(description=f"quantized_model: {e}") from e
    target, draft = paths.stage_dir("moe_model"), paths.stage_dir("draft_model")
    for run in (target, draft):
        if not (run / WEIGHTS_FILE).exists():
            raise dg.Failure(description=f"{run / WEIGHTS_FILE}: missing: materialize {run.name} first")
    try:
        calibration = run_training_rows(target, options.calibration_rows)
        import torch

        heldout = torch.cat(list(run_validation_rows(target).values()))
        out = paths.stage_dir("quantized_model")
        report = build(target, draft, out, calibration, heldout, options, log=context.log.info)
    except ValueError as e:
        raise dg.Failure(description=f"quantized_model: {e}") from e
    columns = ("format", "weights", "KV cache", "val ppl", "vs fp32", "budget", "weight MiB")
    rows = [
        (
            r["label"],
            r["weights"],
            r["kv_cache"],
            f"{r['perplexity']:.3f}",
            f"{r['delta_pct']:+.2f}%",
            "" if r["budget_pct"] is None else f"+{r['budget_pct']}% " + ("met" if r["within_budget"] else "MISSED"),
            f"{r['weight_bytes'] / 2**20:.2f}",
        )
        for r in report["rows"]
    ]
    summary = {f"ppl/{r['label']}": r["perplexity"] for r in report["rows"]}
    summary |= {f"ppl_delta_pct/{r['label']}": r["delta_pct"] for r in report["rows"]}
    summary |= {f"awq/{k}/{m}": v for k, s in report["awq"].items() for m, v in s.items()}
    run_dir = wandb.log_run(
        context, "quantize", summary, tables={"perplexity": (columns, rows)}, config=report["options"]
    )
    metadata = {
        "perplexity": dg.MetadataValue.md(md_table(columns, rows)),
        "val_tokens": report["val_tokens"],
        "calibration_tokens": report["calibration_tokens"],
        "awq": dg.MetadataValue.json(report["awq"]),
        "folder": dg.MetadataValue.path(str(out)),
    }
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


def _report(paths: CurationPaths) -> dict:
    from inference.quantized_model import REPORT_FILE

    return json.loads((paths.stage_dir("quantized_model") / REPORT_FILE).read_text())


@dg.asset_check(
    asset=quantized_model,
    description="Validation perplexity within budget over fp32: INT8 +0.5%, INT4 +3%, INT8 KV cache +0.5%.",
)
def quantization_within_budget(paths: CurationPaths) -> dg.AssetCheckResult:
    rows = [r for r in _report(paths)["rows"] if r["budget_pct"] is not None]
    return dg.AssetCheckResult(
        passed=all(r["within_budget"] for r in rows),
        metadata={r["label"]: f"{r['delta_pct']:+.3f}% (budget +{r['budget_pct']}%)" for r in rows},
    )


@dg.asset_check(
    asset=quantized_model,
    description="The quantized target decodes the same greedy tokens with and without the quantized draft.",
)
def speculative_greedy_is_identical(paths: CurationPaths) -> dg.AssetCheckResult:
    import torch

    from inference.generate import Generator, SamplingConfig
    from inference.speculative import SpeculativeGenerator
    from training.train import run_validation_rows

    folder: Path = paths.stage_dir("quantized_model")
    rows = torch.cat(list(run_validation_rows(paths.stage_dir("moe_model")).values()))
    prompts = [row[:12].tolist() for row in rows[:3]]
    cfg = SamplingConfig(max_new_tokens=24)
    metadata, identical = {}, True
    for scheme in ("int8", "int4"):
        target = Generator.from_run(folder / scheme / "target")
        spec = SpeculativeGenerator(target, Generator.from_run(folder / scheme / "draft"))
        same = all(target.generate_ids(p, cfg) == spec.generate_ids(p, cfg) for p in prompts)
        identical &= same
        metadata[f"{scheme}_identical"] = same
        metadata[f"{scheme}_acceptance_rate"] = spec.stats.acceptance_rate
    return dg.AssetCheckResult(passed=identical, metadata=metadata)


INFERENCE_CHECKS = [quantization_within_budget, speculative_greedy_is_identical]
