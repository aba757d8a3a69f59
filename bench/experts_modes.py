"""One MoE layer of the demo model, compiled as the engine compiles it, in its two modes: sparse (only the chosen
experts' weights, gathered per assignment) against dense (every expert for every token), per weight format and
step size. This is what `inference.runtime.engine.experts.use_sparse` is chosen from.

    .venv/bin/python bench/experts_modes.py [--run data/moe_model] [--tokens 1 4 16 64] [--threads 2]

Each cell: the median of 300 calls of the compiled layer (freezing and the C++ wrapper on, as the engine's
graphs; no autotuning) on random inputs of that many tokens, after 20 warm calls; the two modes' outputs are
checked against each other first. Results: bench/results/experts_modes.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_us(fn, x: torch.Tensor, calls: int = 300) -> float:
    for _ in range(20):
        fn(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[calls // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "data" / "moe_model")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from inference.runtime.engine.compiled import compile_options
    from inference.runtime.engine.experts import GroupedExperts
    from inference.runtime.generate import Generator
    from inference.runtime.quantize import quantize_linears

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    base = Generator.from_run(args.run).model
    rows = []
    for fmt in ("fp32", "int8", "int4"):
        model = copy.deepcopy(base)
        if fmt != "fp32":
            quantize_linears(model, fmt, group_size=32)
        experts = GroupedExperts(model.moe_layers()[0])
        with torch.no_grad(), torch._inductor.config.patch(compile_options(torch.device("cpu"), autotune=False)):
            sparse = torch.compile(experts.sparse, dynamic=False)
            dense = torch.compile(experts.dense, dynamic=False)
            for n in args.tokens:
                x = torch.randn(n, model.config.d_model)
                want = dense(x)
                assert torch.allclose(sparse(x), want, atol=0.02 * want.abs().max().item()), (fmt, n)
                rows.append({"format": fmt, "tokens": n, "sparse_us": median_us(sparse, x),
                             "dense_us": median_us(dense, x)})  # fmt: skip
                print(rows[-1], file=sys.stderr, flush=True)
    out = ROOT / "bench" / "results" / "experts_modes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(args.run), "threads": args.threads, "rows": rows}, indent=1))
    print("| format | tokens | sparse µs | dense µs | dense / sparse |\n|---|---|---|---|---|")
    for r in rows:
        ratio = r["dense_us"] / r["sparse_us"]
        print(f"| {r['format']} | {r['tokens']} | {r['sparse_us']:.0f} | {r['dense_us']:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
