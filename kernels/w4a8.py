"""W4A8 on the CPU: y = x W^T with W in group-wise INT4 and x quantized to INT8 per block of 32 inputs.

This is the scheme of llama.cpp's Q4_0 weights against Q8_0 activations: a decode step is a matrix-vector
product, so it is bound by the bytes of weight it reads, and integer dot products (AVX-512 VNNI's `vpdpbusd`,
64 weights per instruction) keep the arithmetic below that. torch's own INT4 kernel
(`_weight_int4pack_mm_for_cpu`, bf16 activations) read at about 12 GB/s on the 2-core machine, half the
bandwidth (BENCHMARKS.md, issue 31).

Weights follow inference/runtime/quantize.py's Int4Weight: q in [0, 15], one scale s and zero z per group of
`group_size` inputs (32, 64 or 128), w = (q - 8) s + z. The kernel holds s and min = z - 8 s in bf16, so that
w = q s + min.

Layout (`pack`): output rows in tiles of 16, the last padded with zero rows; per tile and block of 32 inputs,
256 bytes in four chunks of 64: 4 bytes per row, whose low nibbles are 4 consecutive inputs of the block's first
half and whose high nibbles are the same 4 of its second half. One 512-bit load then holds 4 weights of each of
16 rows, and one VNNI instruction multiplies all of them by the same 4 activations: each int32 lane is an output
row, so a block's sums come out as a vector of 16 outputs with no horizontal sum. This is the idea of
llama.cpp's repacked Q4_0 GEMV kernels. Scales and mins are laid out (tiles, groups, 16) to match (`tile_rows`).

Activations: per block, dx = absmax / 127 and xq = round(x / dx) in [-127, 127]. The result is
(xq dx) W^T: exact integer dot products per block, scaled by s dx, plus sum_g min_g sum(xq dx over g).
`reference` computes the same in float64 with torch; the test checks the kernel against it under every
ATEN_CPU_CAPABILITY the machine has, and against the unquantized product within the activations' rounding.

The C++ (kernels/csrc/w4a8.cpp) has three paths: plain C++, AVX2 and AVX-512 with VNNI (an AVX-512 CPU without
VNNI takes the AVX2 path). `level()` picks the one torch itself uses (ATEN_CPU_CAPABILITY: default, avx2,
avx512), so a user who turns torch's vectors off turns these off too. It is built once per checkout into
TORCH_EXTENSIONS_DIR (the Makefile points it at .torch_extensions) by torch.utils.cpp_extension, about 10 s with
g++, and registered as the op `frugal_w4a8::linear`, which torch.compile calls from its graphs as it calls an aten
op.

Shape legend: M activation rows (tokens), K inputs, N outputs, G = K / group_size, B = K / 32 blocks.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import torch

BLOCK = 32
ROWS = 16
"""Output rows per tile of the layout."""
SOURCE = Path(__file__).with_name("csrc") / "w4a8.cpp"
LEVELS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
"""torch.backends.cpu.get_cpu_capability() -> the kernel's path."""


def level() -> int:
    """The kernel path for this process: the vector width torch runs at (ATEN_CPU_CAPABILITY), plain C++ on
    anything that is not x86-64 or that torch runs without vectors."""
    return LEVELS.get(torch.backends.cpu.get_cpu_capability(), 0)


def pack(q_NK: torch.Tensor) -> torch.Tensor:
    """q in [0, 15] (any integer dtype, K a multiple of 32) -> uint8 (tiles, K / 32, 256) in the layout above."""
    K = q_NK.shape[1]
    if K % BLOCK:
        raise ValueError(f"W4A8 packs rows of a multiple of {BLOCK} inputs, not {K}")
    q = _pad_rows(q_NK.to(torch.uint8))
    T, B = q.shape[0] // ROWS, K // BLOCK
    q = q.view(T, ROWS, B, 2, 4, 4)  # (tile, row, block, half, chunk k, input in chunk)
    byte = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # (tile, row, block, k, 4)
    return byte.permute(0, 2, 3, 1, 4).reshape(T, B, 4 * ROWS * 4).contiguous()


def unpack(packed: torch.Tensor, n_out: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 (n_out, K) holding 0..15."""
    T, B, _ = packed.shape
    byte = packed.view(T, B, 4, ROWS, 4).permute(0, 3, 1, 2, 4)  # (tile, row, block, k, 4)
    q = torch.stack([byte & 15, byte >> 4], 3)  # (tile, row, block, half, k, 4)
    return q.reshape(T * ROWS, B * BLOCK)[:n_out]


def tile_rows(v_NG: torch.Tensor) -> torch.Tensor:
    """Per-row, per-group values (N, G) -> bf16 (tiles, G, 16), zero in padded rows: the kernel's scale / min."""
    v = _pad_rows(v_NG.to(torch.bfloat16))
    return v.view(-1, ROWS, v.shape[1]).transpose(1, 2).contiguous()


def untile_rows(v_TGR: torch.Tensor, n_out: int) -> torch.Tensor:
    """The inverse of `tile_rows`: (n_out, G)."""
    return v_TGR.transpose(1, 2).reshape(-1, v_TGR.shape[1])[:n_out]


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = -t.shape[0] % ROWS
    return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t


def quantize_activations(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ xq dx: int8 xq (M, K) and fp32 dx (M, K / 32), one absmax / 127 per block of 32 inputs."""
    M, K = x_MK.shape
    xb = x_MK.float().view(M, K // BLOCK, BLOCK)
    dx = xb.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    xq = torch.round(xb * inv[..., None]).to(torch.int8)
    return xq.view(M, K), dx


def dequantized_product(
    x_MK: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    min: torch.Tensor,
    n_out: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The kernel's arithmetic in plain torch ops, in `dtype`: the activations rounded as the kernel rounds them,
    times the dequantized weight. In float32 it is the fallback where the C++ op cannot be built (`linear`)."""
    xq, dx = quantize_activations(x_MK)
    x = (xq.to(dtype).view(*dx.shape, BLOCK) * dx.to(dtype)[..., None]).view(x_MK.shape)
    s = untile_rows(scale, n_out).to(dtype).repeat_interleave(group_size, 1)
    m = untile_rows(min, n_out).to(dtype).repeat_interleave(group_size, 1)
    return x @ (unpack(packed, n_out).to(dtype) * s + m).T


def reference(
    x_MK: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, min: torch.Tensor, n_out: int, group_size: int
) -> torch.Tensor:
    """The kernel's result computed in float64 (`dequantized_product`), returned as fp32: what the tests hold it to."""
    return dequantized_product(x_MK, packed, scale, min, n_out, group_size, torch.float64).float()


_BUILT: bool | None = None
"""Whether the C++ op is registered: None until `load` has tried."""


def load() -> bool:
    """Build the C++ op once per checkout (torch caches it by the source's hash) and register it. Without a
    C++ compiler and ninja it cannot be built: INT4 layers then run `dequantized_product`, the same arithmetic in
    torch ops (correct, several times slower), and say so once in a warning."""
    global _BUILT
    if _BUILT is not None:
        return _BUILT
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name="frugal_w4a8",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fno-math-errno", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"kernels.w4a8: could not build {SOURCE} ({str(e).strip().splitlines()[-1] if str(e).strip() else e}); "
            "INT4 layers run on plain torch ops, several times slower. Install a C++ compiler and ninja to build it.",
            stacklevel=2,
        )
        _BUILT = False
        return False

    @torch.library.register_fake("frugal_w4a8::linear")
    def _(x, packed, scale, min, n_out, group, level):
        return x.new_empty(x.shape[0], n_out)

    _BUILT = True
    return True


def linear(
    x_MK: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    min: torch.Tensor,
    n_out: int,
    group_size: int,
    path: int | None = None,
) -> torch.Tensor:
    """y (M, n_out) fp32 = x W^T; x fp32 (M, K), the weight as `pack` and `tile_rows` lay it out.
    `path` is `level()` unless given; a layer fixes it when it is built (inside torch.compile's graphs it is a
    constant, which inductor's cache keys by the vector width: inference.runtime.engine.compiled)."""
    if not (_BUILT if torch.compiler.is_compiling() else load()):
        return dequantized_product(x_MK, packed, scale, min, n_out, group_size)
    return torch.ops.frugal_w4a8.linear(
        x_MK.contiguous(), packed, scale, min, n_out, group_size, level() if path is None else path
    )
