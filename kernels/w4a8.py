"""W4A8 on the CPU: y = x W^T with W in group-wise INT4 and x quantized to INT8 per block of 32 inputs.

This is the scheme of llama.cpp's Q4_0 weights against Q8_0 activations: a decode step is a matrix-vector
product, so it is bound by the bytes of weight it reads, and the integer dot products (`maddubs`) unpack and
multiply 64 weights per AVX-512 instruction. torch's own INT4 kernel (`_weight_int4pack_mm_for_cpu`, bf16
activations) read at about 12 GB/s on the 2-core machine, half the bandwidth (BENCHMARKS.md, issue 31).

Weights follow inference/runtime/quantize.py's Int4Weight: q in [0, 15], one scale s and zero z per group of
`group_size` inputs (32, 64 or 128), w = (q - 8) s + z. The kernel holds s and min = z - 8 s in bf16, so that
w = q s + min.

Layout (`pack`): blocks of 32 inputs, 16 bytes each. Byte i of block b of a row holds input 32b + i in its low
nibble and input 32b + 16 + i in its high nibble, so a row is (K / 2) bytes, one block contiguous.

Activations: per block, dx = absmax / 127 and xq = round(x / dx) in [-127, 127]. The result is
(xq dx) W^T: exact integer dot products per block, scaled by s dx, plus sum_g min_g sum(xq dx over g).
`reference` computes the same in float64 with torch; the test checks the kernel against it under every
ATEN_CPU_CAPABILITY the machine has, and against the unquantized product within the activations' rounding.

The C++ (kernels/csrc/w4a8.cpp) has three paths: plain C++, AVX2 and AVX-512. `level()` picks the one torch
itself uses (ATEN_CPU_CAPABILITY: default, avx2, avx512), so a user who turns torch's vectors off turns these
off too. It is built once per checkout into TORCH_EXTENSIONS_DIR (`make install` points it at
.torch_extensions) by torch.utils.cpp_extension, about 30 s with g++, and registered as the op
`frugal_w4a8::linear`, which torch.compile calls from its graphs as it calls an aten op.

Shape legend: M activation rows (tokens), K inputs, N outputs, G = K / group_size, B = K / 32 blocks.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import torch

BLOCK = 32
SOURCE = Path(__file__).with_name("csrc") / "w4a8.cpp"
LEVELS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
"""torch.backends.cpu.get_cpu_capability() -> the kernel's path."""


def level() -> int:
    """The kernel path for this process: the vector width torch runs at (ATEN_CPU_CAPABILITY), plain C++ on
    anything that is not x86-64 or that torch runs without vectors."""
    return LEVELS.get(torch.backends.cpu.get_cpu_capability(), 0)


def pack(q_NK: torch.Tensor) -> torch.Tensor:
    """q in [0, 15] (any integer dtype, K a multiple of 32) -> uint8 (N, K / 2) in the block layout above."""
    N, K = q_NK.shape
    if K % BLOCK:
        raise ValueError(f"W4A8 packs rows of a multiple of {BLOCK} inputs, not {K}")
    q = q_NK.to(torch.uint8).view(N, K // BLOCK, 2, BLOCK // 2)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack(packed_NP: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: uint8 (N, K) holding 0..15."""
    N, P = packed_NP.shape
    b = packed_NP.view(N, P // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([b & 15, b >> 4], 2).reshape(N, 2 * P)


def quantize_activations(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ xq dx: int8 xq (M, K) and fp32 dx (M, K / 32), one absmax / 127 per block of 32 inputs."""
    M, K = x_MK.shape
    xb = x_MK.float().view(M, K // BLOCK, BLOCK)
    dx = xb.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    xq = torch.round(xb * inv[..., None]).to(torch.int8)
    return xq.view(M, K), dx


def reference(
    x_MK: torch.Tensor, packed_NP: torch.Tensor, scale_NG: torch.Tensor, min_NG: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Plain torch, in float64: the activations rounded as the kernel rounds them, times the dequantized weight."""
    xq, dx = quantize_activations(x_MK)
    x = (xq.double().view(*dx.shape, BLOCK) * dx.double()[..., None]).view(x_MK.shape)
    s = scale_NG.double().repeat_interleave(group_size, 1)
    m = min_NG.double().repeat_interleave(group_size, 1)
    w = unpack(packed_NP).double() * s + m
    return (x @ w.T).float()


_BUILT: bool | None = None
"""Whether the C++ op is registered: None until `load` has tried."""


def load() -> bool:
    """Build the C++ op once per checkout (torch caches it by the source's hash) and register it. Without a
    C++ compiler and ninja it cannot be built: INT4 layers then run `linear_torch`, the same arithmetic in torch
    ops (correct, several times slower), and say so once in a warning."""
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
    def _(x, packed, scale, min, group, level):
        return x.new_empty(x.shape[0], packed.shape[0])

    _BUILT = True
    return True


def linear_torch(
    x_MK: torch.Tensor, packed_NP: torch.Tensor, scale_NG: torch.Tensor, min_NG: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The kernel's arithmetic in fp32 torch ops: the fallback where the C++ op cannot be built."""
    xq, dx = quantize_activations(x_MK)
    M, K = x_MK.shape
    x = (xq.float().view(M, K // BLOCK, BLOCK) * dx[..., None]).view(M, K)
    w = unpack(packed_NP).float() * scale_NG.float().repeat_interleave(group_size, 1)
    return x @ w.T + x.view(M, -1, group_size).sum(-1) @ min_NG.float().T


def linear(
    x_MK: torch.Tensor,
    packed_NP: torch.Tensor,
    scale_NG: torch.Tensor,
    min_NG: torch.Tensor,
    group_size: int,
    path: int | None = None,
) -> torch.Tensor:
    """y (M, N) fp32 = x W^T; x fp32 (M, K), the weight as `pack` lays it out with bf16 scale and min (N, G).
    `path` is `level()` unless given; a layer fixes it when it is built (inside torch.compile's graphs it is a
    constant, which inductor's cache keys by the vector width: inference.runtime.engine.compiled)."""
    if not (_BUILT if torch.compiler.is_compiling() else load()):
        return linear_torch(x_MK, packed_NP, scale_NG, min_NG, group_size)
    return torch.ops.frugal_w4a8.linear(
        x_MK.contiguous(), packed_NP, scale_NG, min_NG, group_size, level() if path is None else path
    )
