"""The roofline projection of benchmark_report (inference.roofline), checked on a GPU: moe_1b and its dense
equivalent decoded at batch 1 and 64, measured against what the projection predicts for this GPU.

    .venv/bin/python bench/gpu_cost.py [--multiplier M] [--batches 1 64] [--context 1024] [--steps 64]
        [--price-per-hour 2.50]

CUDA only: without a GPU it says so and exits 0. The GPU is looked up by name in inference.roofline.GPUS (its
datasheet bandwidth and bf16 FLOP/s); an unknown GPU is measured for its own bandwidth (a large sum) and matmul
FLOP/s. The dense equivalent applies the dense-equivalent multiplier (`--multiplier`, default: the one
data/dense_scaling/results.json holds) to moe_1b's active non-embedding parameters, as benchmark_report does.

Weights are random (speed does not depend on what they learned), in bf16. Each configuration decodes `--steps`
tokens for every request of the batch after a `--context`-token cache, through torch.compile (dynamic shapes,
so that each position reuses the graph) on the model's own forward; the time is the median step over the steps
after warm-up. Not yet run: no GPU has been lent to this project's sessions since it was written.
Writes bench/results/gpu_cost.json and prints a Markdown table of predicted and measured tokens/s and $ per 1M.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose inference.py would shadow the package

from inference import roofline  # noqa: E402
from model.config import moe_1b  # noqa: E402
from model.transformer import LayerCache, Transformer  # noqa: E402
from training.scaling import d_ff_for, dense_config, non_embedding_params  # noqa: E402

OUT = ROOT / "bench" / "results" / "gpu_cost.json"


def device_of(price: float) -> roofline.Device:
    name = torch.cuda.get_device_name()
    for key, spec in roofline.GPUS.items():
        if key.split()[0] in name:
            return roofline.Device(name, **spec, price_per_hour=price)
    x = torch.ones(2**28, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        x.sum()
    torch.cuda.synchronize()
    bandwidth = 10 * x.numel() * 4 / (time.perf_counter() - start)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return roofline.Device(name, bandwidth, 10 * 2 * 8192**3 / (time.perf_counter() - start), price)


@torch.no_grad()
def decode_ms(config, batch: int, context: int, steps: int) -> float:
    torch.manual_seed(0)
    model = Transformer(config).to("cuda", torch.bfloat16).eval()
    kv = config.n_kv_heads or config.n_heads
    shape = (batch, kv, context + steps + 1, config.head_dim)
    cache = [LayerCache(torch.zeros(shape, device="cuda", dtype=torch.bfloat16),
                        torch.zeros(shape, device="cuda", dtype=torch.bfloat16)) for _ in model.layers]  # fmt: skip
    model(torch.ones(batch, context, dtype=torch.long, device="cuda"), 0, cache)
    step = torch.compile(model, dynamic=True)  # the position is an argument, not a recompilation
    x = torch.ones(batch, 1, dtype=torch.long, device="cuda")
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(x, context + i, cache)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[steps // 2 :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiplier", type=float)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--price-per-hour", type=float, default=2.50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_cost.py: no CUDA device here; nothing measured")
        return
    multiplier = args.multiplier
    if multiplier is None:
        study = json.loads((ROOT / "data" / "dense_scaling" / "results.json").read_text())
        multiplier = study["equal_quality"]["multiplier"]
    big = moe_1b()
    models = {
        "moe_1b": big,
        "dense equivalent": dense_config(big, d_ff_for(big, multiplier * non_embedding_params(big), 128)),
    }
    device = device_of(args.price_per_hour)
    rows = []
    for name, config in models.items():
        for batch in args.batches:
            predicted = roofline.project(config, device, batch, args.context, 2.0, 2.0)
            ms = decode_ms(config, batch, args.context, args.steps)
            measured = batch / (ms / 1e3)
            rows.append({"model": name, "batch": batch, "predicted_tokens_per_s": predicted["tokens_per_s"],
                         "bound": predicted["bound"], "measured_tokens_per_s": measured,
                         "measured_over_predicted": measured / predicted["tokens_per_s"],
                         "predicted_usd_per_1m": predicted["usd_per_1m"],
                         "measured_usd_per_1m": args.price_per_hour / (measured * 3600) * 1e6})  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"device": device.__dict__, "multiplier": multiplier, "rows": rows}, indent=2) + "\n")
    print(
        f"{device.name}, bf16, context {args.context}, ${args.price_per_hour}/GPU-hour, multiplier {multiplier:.2f}\n"
    )
    print("| model | batch | bound | predicted tok/s | measured tok/s | measured / predicted | measured $ / 1M |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['bound']} | {r['predicted_tokens_per_s']:,.0f} | "
              f"{r['measured_tokens_per_s']:,.0f} | {r['measured_over_predicted']:.2f} | "
              f"{r['measured_usd_per_1m']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
