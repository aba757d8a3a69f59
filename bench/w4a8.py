"""The INT4 matmul kernels of one decode step, alone: every weight matrix of the 91M dense model of
`bench/peers.py` (12 layers of d_model 768, d_ff 2048, and the 8,192 x 768 head), one call per matrix, at 1, 4
and 16 rows. Side by side, in one run, interleaved:

- fp32: `F.linear` (oneDNN);
- INT8: torch's `_weight_int8pack_mm` (what Int8Linear runs), bf16 activations;
- INT4 torch: torch's `_weight_int4pack_mm_for_cpu` (what Int4Linear ran before kernels/w4a8.py), bf16 activations;
- INT4 W4A8: kernels/w4a8.py (what Int4Linear runs now), on each path this CPU has.

Reports ms per pass over all matrices (median of --repeats) and the weight bytes read per second. The read
bandwidth of the machine (torch.sum over 1 GiB) is the ceiling.

    .venv/bin/python bench/w4a8.py [--threads 2] [--repeats 15] [--group 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "w4a8.json"
SHAPES = ([(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]) * 12 + [(8192, 768)]
"""(out, in) of every matrix of a decode step of the 91M model, in order."""


def formats(group: int) -> dict:
    """Per format: (weights per matrix, bytes, the call for an activation dict {in: (M, in)})."""
    from kernels import w4a8

    torch.manual_seed(0)
    fp, i8, i4t, i4w = [], [], [], []
    for N, K in SHAPES:
        w = torch.randn(N, K) * 0.02
        fp.append(w)
        i8.append((torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).to(torch.bfloat16)))
        q = torch.randint(0, 16, (N, K))
        sz = torch.rand(K // group, N, 2).to(torch.bfloat16)
        i4t.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2), sz))
        s = w4a8.tile_rows(torch.rand(N, K // group) * 0.01)
        i4w.append((w4a8.pack(q), s, s.clone(), N))
    w4a8.load()
    out = {
        "fp32": (lambda x: [F.linear(x["f"][w.shape[1]], w) for w in fp], sum(w.numel() * 4 for w in fp)),
        "int8 (torch)": (
            lambda x: [torch.ops.aten._weight_int8pack_mm(x["b"][q.shape[1]], q, s) for q, s in i8],
            sum(q.numel() + s.numel() * 2 for q, s in i8),
        ),
        "int4 (torch)": (
            lambda x: [
                torch.ops.aten._weight_int4pack_mm_for_cpu(x["b"][p.shape[1] * 2], p, group, sz) for p, sz in i4t
            ],
            sum(p.numel() + sz.numel() * 2 for p, sz in i4t),
        ),
    }
    names = {0: "plain", 1: "avx2", 2: "avx512"}
    for path in range(w4a8.level() + 1):
        out[f"int4 W4A8 ({names[path]})"] = (
            lambda x, path=path: [
                w4a8.linear(x["f"][p.shape[1] * 32], p, s, m, n, group, path) for p, s, m, n in i4w
            ],
            sum(p.numel() + s.numel() * 4 for p, s, _, _ in i4w),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bench.peers import read_bandwidth

    bandwidth = read_bandwidth(args.threads)
    kinds = formats(args.group)
    result = {"threads": args.threads, "group": args.group, "bandwidth_gb_s": bandwidth,
              "cpu": torch.backends.cpu.get_cpu_capability(), "rows": {}}  # fmt: skip
    for M in args.rows:
        x = {"f": {K: torch.randn(M, K) for K in (768, 2048)}}
        x["b"] = {K: v.to(torch.bfloat16) for K, v in x["f"].items()}
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for call, _ in kinds.values():  # warm up
            call(x)
        for _ in range(args.repeats):  # interleaved, so that the machine's drift hits every format alike
            for name, (call, _) in kinds.items():
                start = time.perf_counter()
                call(x)
                times[name].append(time.perf_counter() - start)
        result["rows"][M] = {
            name: {"ms": sorted(t)[len(t) // 2] * 1e3, "bytes": kinds[name][1]} for name, t in times.items()
        }
    lines = [
        f"Read bandwidth {bandwidth:.1f} GB/s, {args.threads} threads, {result['cpu']}, INT4 group {args.group}; "
        "ms per pass over the 91M model's matrices (median), weight GB/s at 1 row",
        "",
        "| format | " + " | ".join(f"{M} row{'s' if M > 1 else ''}, ms" for M in args.rows) + " | GB/s at 1 row |",
        "|---|" + "---:|" * (len(args.rows) + 1),
    ]
    for name in kinds:
        ms = [result["rows"][M][name]["ms"] for M in args.rows]
        gbs = result["rows"][args.rows[0]][name]["bytes"] / ms[0] / 1e6
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in ms) + f" | {gbs:.1f} |")
    print("\n".join(lines))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{OUT}")


if __name__ == "__main__":
    main()
