"""Build the quantized models that inference serves, and measure what quantization costs in quality.

For each scheme (INT8 per channel; INT4 group-wise, AWQ-calibrated by default) the target and the draft
are quantized and saved under OUT/<scheme>/{target,draft} (inference.runtime.quantize.save_quantized: portable
safetensors, tokenizer.json beside them), and the target also gets per-channel KV-cache scales
(`kv_scales.safetensors`, for `Generator.from_run(..., kv_cache="int8-channel")`). Then the target's
validation perplexity is measured, through the KV cache, for every weight format and KV-cache format:

    fp32, bf16, int8, int4 (plain), int4 (AWQ), and fp32 weights with an INT8 cache per token and per channel

against the budgets of the benchmark (INT8 +0.5%, INT4 +3%, INT8 KV cache +0.5% over fp32).

CLI: python -m inference.quantized_model --target data/moe_model --draft data/draft_model --out DIR
(calibration and held-out rows come from the target's training run: see training.train).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference.evaluate import perplexity
from inference.runtime.kv_cache import KV_SCALES_FILE, calibrate_channel_scales, save_kv_scales, use_int8_kv_cache
from inference.runtime.quantize import (
    QuantConfig,
    check_quantizable,
    load_quantized,
    quantize_weights,
    save_quantized,
    weight_bytes,
)
from model.io import atomic_dir, atomic_file, load_model, write_text_atomic

REPORT_FILE = "report.json"
BUDGETS = {"int8": 0.5, "int4": 3.0, "int8 kv": 0.5}
"""Largest perplexity increase over fp32 allowed, in percent, by kind."""


@dataclass
class QuantizeOptions:
    group_size: int = 64
    symmetric: bool = False
    awq: bool = True
    """Activation-aware scaling for INT4 (INT8 is quantized plainly: its error is already far below budget)."""
    calibration_rows: int = 32
    val_rows: int = 64
    schemes: tuple[str, ...] = field(default=("int8", "int4"))

    def config(self, scheme: str) -> QuantConfig:
        if scheme == "int8":
            return QuantConfig("int8")
        return QuantConfig("int4", self.group_size, self.symmetric, awq=self.awq)


@dataclass
class Row:
    label: str
    weights: str
    kv_cache: str
    perplexity: float
    nll: float
    weight_bytes: int
    budget_pct: float | None

    def delta_pct(self, base: Row) -> float:
        return 100 * (self.perplexity / base.perplexity - 1)


def quantize_run(
    run_dir: Path, out_dir: Path, cfg: QuantConfig, calibration_BT: torch.Tensor | None
) -> dict[str, float | int] | None:
    """Quantize one trained run into out_dir (weights, config, quantization.json, tokenizer.json); returns
    the AWQ summary when calibrated."""
    model = load_model(run_dir)
    try:
        check_quantizable(model, cfg)
    except ValueError as e:
        raise ValueError(f"{run_dir}: {e}") from e
    scales, summary = None, None
    if cfg.awq:
        from inference.awq import awq_calibrate

        if calibration_BT is None:
            raise ValueError("AWQ needs calibration rows")
        calibration = awq_calibrate(model, list(calibration_BT.split(8)), cfg)
        scales, summary = calibration.input_scales, calibration.summary()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_quantized(model, quantize_weights(model, cfg, scales), cfg, out_dir)
    with atomic_file(out_dir / "tokenizer.json") as tmp:
        shutil.copy(Path(run_dir) / "tokenizer.json", tmp)
    return summary


def build(
    target_run: Path,
    draft_run: Path,
    out_dir: Path,
    calibration_BT: torch.Tensor,
    heldout_NT: torch.Tensor,
    options: QuantizeOptions,
    log=print,
) -> dict:
    """Quantize target and draft for each scheme, calibrate the per-channel KV scales, measure perplexity.
    Returns the report (also written to OUT/report.json). OUT is replaced as a whole when everything is written
    (model.io.atomic_dir): a killed build leaves the previous folder, never a mix of two builds."""
    with atomic_dir(Path(out_dir)) as staging:
        return _build(target_run, draft_run, staging, calibration_BT, heldout_NT, options, log)


def _build(target_run, draft_run, out_dir: Path, calibration_BT, heldout_NT, options: QuantizeOptions, log) -> dict:
    heldout_NT = heldout_NT[: options.val_rows]
    awq: dict[str, dict] = {}
    for scheme in options.schemes:
        cfg = options.config(scheme)
        for role, run in (("target", target_run), ("draft", draft_run)):
            start = time.perf_counter()
            summary = quantize_run(run, out_dir / scheme / role, cfg, calibration_BT)
            if summary:
                awq[f"{scheme}/{role}"] = summary
            log(f"{scheme} {role}: quantized in {time.perf_counter() - start:.1f} s")
    fp32 = load_model(target_run)
    kv_scales = calibrate_channel_scales(fp32, list(calibration_BT[:, :-1].split(8)))
    for scheme in options.schemes:
        save_kv_scales(kv_scales, out_dir / scheme / "target" / KV_SCALES_FILE)

    def measure(label: str, weights: str, kv: str, model, budget: float | None) -> Row:
        start = time.perf_counter()
        ppl, nll = perplexity(model, heldout_NT)
        log(f"perplexity {label}: {ppl:.3f} ({time.perf_counter() - start:.1f} s)")
        return Row(label, weights, kv, ppl, nll, weight_bytes(model), budget)

    rows = [measure("fp32", "fp32", "fp32", fp32, None)]
    rows.append(measure("bf16", "bf16", "fp32", load_model(target_run).to(torch.bfloat16), None))
    for scheme in options.schemes:
        cfg = options.config(scheme)
        rows.append(
            measure(scheme, describe(cfg), "fp32", load_quantized(out_dir / scheme / "target"), BUDGETS[scheme])
        )
        if scheme == "int4" and cfg.awq:  # what calibration buys: the same scheme without it
            plain = load_model(target_run)
            from inference.runtime.quantize import apply_quantized

            apply_quantized(plain, quantize_weights(plain, dataclasses.replace(cfg, awq=False)))
            rows.append(measure("int4 (no AWQ)", describe(dataclasses.replace(cfg, awq=False)), "fp32", plain, None))
    rows.append(
        measure("int8 kv (per token)", "fp32", "int8 per token", use_int8_kv_cache(load_model(target_run)), 0.5)
    )
    per_channel = use_int8_kv_cache(load_model(target_run), kv_scales)
    rows.append(measure("int8 kv (per channel)", "fp32", "int8 per channel", per_channel, 0.5))
    base = rows[0]
    report = {
        "target_run": str(target_run),
        "draft_run": str(draft_run),
        "val_tokens": int(heldout_NT[:, 1:].numel()),
        "calibration_tokens": int(calibration_BT.numel()),
        "options": dataclasses.asdict(options),
        "awq": awq,
        "rows": [
            {**dataclasses.asdict(r), "delta_pct": r.delta_pct(base), "within_budget": within(r, base)} for r in rows
        ],
    }
    write_text_atomic(out_dir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report


def within(row: Row, base: Row) -> bool | None:
    return None if row.budget_pct is None else row.delta_pct(base) <= row.budget_pct


def describe(cfg: QuantConfig) -> str:
    if cfg.scheme == "int8":
        return "int8 per channel"
    kind = "sym" if cfg.symmetric else "asym"
    return f"int4 g{cfg.group_size} {kind}" + (" AWQ" if cfg.awq else "")


def main(argv: list[str] | None = None) -> None:
    from training.data import run_training_rows, run_validation_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--no-awq", action="store_true")
    args = parser.parse_args(argv)
    options = QuantizeOptions(group_size=args.group_size, symmetric=args.symmetric, awq=not args.no_awq)
    options.config("int4").check()
    calibration = run_training_rows(args.target, options.calibration_rows)
    heldout = torch.cat(list(run_validation_rows(args.target).values()))
    report = build(args.target, args.draft, args.out, calibration, heldout, options)
    for row in report["rows"]:
        print(
            f"{row['label']:24} ppl {row['perplexity']:9.3f}  {row['delta_pct']:+6.2f}%  {row['weight_bytes']:>12,} B"
        )


if __name__ == "__main__":
    main()
