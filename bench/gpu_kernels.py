"""GPU benchmark of the Triton kernels at LLM shapes: the W4A16 matmul against torch's fp16 matmul, and decode
attention over the INT8 cache against SDPA over an fp16 cache.

    .venv/bin/python bench/gpu_kernels.py

CUDA only: on a machine without a GPU it says so and exits 0. Times are medians of triton.testing.do_bench.
GB/s = the bytes a call must move at least (weights or cache once, activations in and out) / its time:
decoding is memory-bound, so GB/s against the GPU's peak bandwidth says how close a kernel comes to its
floor, and a kernel moving 4x fewer bytes at the same GB/s is 4x faster. The last column is the largest
difference from the unquantized fp16 result (scaled by that result's largest magnitude), a sanity check
that the fast path computes the same thing (for W4A16 it includes the INT4 rounding of the weights).

Shapes: Llama-3-8B-like projections (d_model 4096, FFN 14336, INT4 groups of 128) for 1 and 16 tokens;
decode attention with 32 query heads on 8 kv heads of 128 dims, one new token at the end of 4k and 16k
caches, batch 1 and 8.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.runtime.quantize import quantize_int4
from kernels.attention_int8 import attention_int8_triton
from kernels.kv_int8 import quantize_per_token_reference
from kernels.w4a16 import pack_int4, w4a16_matmul_triton

GROUP_SIZE = 128
MATMUL_SHAPES = [(M, N, K) for M in (1, 16) for N, K in ((4096, 4096), (14336, 4096), (4096, 14336))]
ATTENTION_SHAPES = [(B, 32, 8, S, 128) for B in (1, 8) for S in (4096, 16384)]  # (B, H, G, S, Dh)


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def bench_w4a16(M: int, N: int, K: int) -> list[tuple]:
    weight = quantize_int4(torch.randn(N, K, device="cuda") * 0.02, GROUP_SIZE)
    packed_NP, scale_NG, zero_NG = pack_int4(weight.q_NK), weight.scale_NG, weight.zero_NG
    x_MK = torch.randn(M, K, device="cuda", dtype=torch.float16)
    w_NK = weight.dequantize().half()

    def w4a16():
        return w4a16_matmul_triton(x_MK, packed_NP, scale_NG, zero_NG, GROUP_SIZE)

    def fp16():
        return x_MK @ w_NK.T

    io_bytes = 2 * (M * K + M * N)
    fp16_bytes = 2 * N * K + io_bytes
    w4_bytes = N * K // 2 + 2 * 4 * scale_NG.numel() + io_bytes
    ms_fp16, ms_w4 = median_ms(fp16), median_ms(w4a16)
    label = f"M={M} N={N} K={K}"
    return [
        ("matmul", label, "torch fp16", ms_fp16, fp16_bytes / ms_fp16 / 1e6, 0.0),
        ("matmul", label, "triton w4a16", ms_w4, w4_bytes / ms_w4 / 1e6, relative_error(w4a16(), fp16())),
    ]


def bench_attention(B: int, H: int, G: int, S: int, Dh: int) -> list[tuple]:
    q_BHTD = torch.randn(B, H, 1, Dh, device="cuda", dtype=torch.float16)
    k_BGSD = torch.randn(B, G, S, Dh, device="cuda", dtype=torch.float16)
    v_BGSD = torch.randn(B, G, S, Dh, device="cuda", dtype=torch.float16)
    cache = (*quantize_per_token_reference(k_BGSD), *quantize_per_token_reference(v_BGSD))

    def int8():
        return attention_int8_triton(q_BHTD, *cache, S - 1)  # the new token is the cache's last: it sees all

    def sdpa():
        return F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, enable_gqa=True)

    io_bytes = 2 * 2 * q_BHTD.numel()
    sdpa_bytes = 2 * 2 * k_BGSD.numel() + io_bytes
    int8_bytes = 2 * (k_BGSD.numel() + 4 * B * G * S) + io_bytes
    ms_sdpa, ms_int8 = median_ms(sdpa), median_ms(int8)
    label = f"B={B} H={H} G={G} S={S} Dh={Dh}"
    return [
        ("attention", label, "sdpa fp16 cache", ms_sdpa, sdpa_bytes / ms_sdpa / 1e6, 0.0),
        ("attention", label, "triton int8 cache", ms_int8, int8_bytes / ms_int8 / 1e6, relative_error(int8(), sdpa())),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py times the Triton kernels on a CUDA GPU, and this machine has none: nothing to do.")
        return 0
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'op':<10} {'shape':<30} {'path':<18} {'ms':>8} {'GB/s':>8} {'rel. err':>9}")
    rows = [row for shape in MATMUL_SHAPES for row in bench_w4a16(*shape)]
    rows += [row for shape in ATTENTION_SHAPES for row in bench_attention(*shape)]
    for op, shape, path, ms, gbps, error in rows:
        print(f"{op:<10} {shape:<30} {path:<18} {ms:>8.4f} {gbps:>8.0f} {error:>9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
