"""Inference benchmark: the trained small_cpu MoE model with fp32, bf16, INT8 and INT4 weights (plain and
AWQ-calibrated), an fp32 or INT8 KV cache, each decoded plainly and speculatively with the draft model.

Usage: python bench/inference.py [--data-dir data] [--prompts 8] [--new-tokens 48]   (or `make bench-inference`)

Uses the runs `make demo` trains (FRUGAL_DATA_DIR/moe_model and /draft_model). INT8 and INT4 (AWQ, calibrated
on training rows) target and draft are built by inference.quantized_model.build, as the quantized_model
asset builds them, into bench/results/inference/, and loaded from there.
Each weight/KV configuration is then measured in its own fresh process, at batch 1, greedy:

- tokens/s and ms/token over `--prompts` held-out document openings, `--new-tokens` each, plain and
  speculative (the draft quantized like the target); the outputs must be identical;
- peak memory: the process's peak resident memory (sampled every 2 ms) from loading the models to the
  end of decoding, above what it held before (the torch runtime and the evaluation rows);
- weight bytes, and validation perplexity on the held-out rows, decoded through the KV cache;
- the cost model of speculation: one target forward pass over 1 and over gamma + 1 positions, one draft
  pass, and the speedup a draft that is always right would give with them, (gamma + 1) T_1 / (gamma D + T_verify);
- the roofline: every byte of weights and cache a forward pass reads is counted (inference.evaluate.
  ByteCounter); achieved bandwidth = bytes read / time, as a share of this machine's measured bandwidth.

Results: bench/results/inference.json, and the table printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.benchmark import Config, Workload, run  # noqa: E402
from inference.evaluate import memory_bandwidth  # noqa: E402

OUT = ROOT / "bench" / "results"
CONFIGS = [  # (label, weights, KV cache)
    ("fp32", "fp32", "fp32"),
    ("bf16", "bf16", "fp32"),
    ("int8", "int8", "fp32"),
    ("int4 awq", "int4", "fp32"),
    ("fp32 + int8 kv", "fp32", "int8"),
    ("int4 awq + int8 kv", "int4", "int8"),
]


def prepare(data_dir: Path, work: Path, calibration_rows: int) -> dict:
    """What the quantized_model asset builds, into `work`: int8/ and int4/ (AWQ) {target,draft}."""
    from inference.quantized_model import QuantizeOptions, build
    from training.data import run_training_rows, run_validation_rows

    target = data_dir / "moe_model"
    options = QuantizeOptions(calibration_rows=calibration_rows)
    calibration = run_training_rows(target, calibration_rows)
    heldout = torch.cat(list(run_validation_rows(target).values()))
    return build(target, data_dir / "draft_model", work, calibration, heldout, options, log=lambda m: print(" ", m))


def config(data_dir: Path, work: Path, label: str, weights: str, kv: str) -> Config:
    if weights in ("fp32", "bf16"):
        return Config(label, str(data_dir / "moe_model"), str(data_dir / "draft_model"), kv, weights)
    return Config(label, str(work / weights / "target"), str(work / weights / "draft"), kv)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(results: dict, bandwidth: float) -> str:
    base = results["fp32"]
    cols = [
        "weights / KV cache",
        "decoding",
        "tok/s",
        "ms/token",
        "vs fp32 plain",
        "weight MiB",
        "peak MiB",
        "val ppl",
        "ppl vs fp32",
        "acceptance",
        "tokens/round",
        "ms per forward: target 1 / verify / draft 1",
        "speedup ceiling",
        "MiB read/token",
        "% of roofline",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, r in results.items():
        for mode in ("plain", "speculative"):
            m = r[mode]
            spec = mode == "speculative"
            achieved = m["bytes_per_token"] * m["tokens_per_s"]
            cells = [
                label,
                mode + ("" if not spec else " (identical)" if r["identical"] else " (DIFFERS)"),
                f"{m['tokens_per_s']:.1f}",
                f"{m['ms_per_token']:.2f}",
                f"{m['tokens_per_s'] / base['plain']['tokens_per_s']:.2f}x",
                mib(m["weight_bytes"]),
                mib(m["peak_bytes"]),
                f"{r['perplexity']:.2f}",
                f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%",
                f"{m['acceptance_rate']:.2f}" if spec else "",
                f"{m['mean_accepted_length']:.2f}" if spec else "",
                "{target_1:.2f} / {target_verify:.2f} / {draft_1:.2f}".format(**m["forward_ms"]) if spec else "",
                f"{m['forward_ms']['ceiling']:.2f}x" if spec else "",
                f"{m['bytes_per_token'] / 2**20:.2f}",
                f"{100 * achieved / bandwidth:.1f}%",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from training.data import run_validation_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FRUGAL_DATA_DIR", ROOT / "data")))
    parser.add_argument("--work", type=Path, default=OUT / "inference")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--calibration-rows", type=int, default=32)
    args = parser.parse_args()
    for name in ("moe_model", "draft_model"):
        if not (args.data_dir / name / "model.safetensors").exists():
            sys.exit(f"{args.data_dir / name}: no trained model: run `make demo` first")

    started = time.perf_counter()
    print("quantizing target and draft (as the quantized_model asset does) ...", flush=True)
    quantization = prepare(args.data_dir, args.work, args.calibration_rows)
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = torch.cat(list(run_validation_rows(args.data_dir / "moe_model").values()))
    step = max(1, len(rows) // args.prompts)
    prompts = [row[: args.prompt_tokens].tolist() for row in rows[::step][: args.prompts]]
    workload = Workload(rows, prompts, args.new_tokens, args.gamma)
    configs = [config(args.data_dir, args.work, *c) for c in CONFIGS]
    results = run(configs, workload, args.work, log=lambda m: print(m, flush=True))
    summary = {
        "bandwidth_bytes_per_s": bandwidth,
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "gamma": args.gamma,
        "seconds": time.perf_counter() - started,
        "configs": results,
        "quantization": quantization,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "inference.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\nbatch 1, greedy, {args.prompts} prompts x {args.new_tokens} new tokens, gamma {args.gamma}, "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads\n"
    )
    print(table(results, bandwidth))


if __name__ == "__main__":
    main()
