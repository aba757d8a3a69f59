"""torch's private CPU kernel for weight-only INT8 matmuls, behind the preconditions it assumes.

Frugal's INT8 layers (inference.runtime.quantize) run on a private aten op. Their preconditions are
written down nowhere, and some are not checked by the op itself: a breach is a segmentation fault, not
an error. Every call of that op goes through this module, which checks what they need and names the tensor
that breaks it.

What was measured (torch 2.13.0 CPU build; the probes are in tests/kernels/test_native.py):

- `_weight_int8pack_mm(x_MK, q_NK, scale_N)`, with M >= 4 rows under ATEN_CPU_CAPABILITY=avx512, reads x and q
  with aligned vector loads. It segfaults when x is not 32-byte aligned, when q is not 16-byte aligned, or when
  K is not a multiple of 16 (row starts then fall off alignment even from an aligned base). Under avx2, x must
  be 16-byte aligned. A weight read from safetensors sits wherever the file put it: 8-byte aligned, or less.
  The op itself checks only contiguity.
- INT4 layers ran on `_weight_int4pack_mm_for_cpu` until it was measured to read at half the bandwidth; they now
  run on Frugal's own kernel (kernels/w4a8.py), which checks its inputs itself.

The rule here is simpler and stronger than any one measurement: every tensor handed to this op is
contiguous, owned by torch's allocator (not a view into a file, a mmap or a foreign buffer) and aligned to
64 bytes, which is what that allocator gives every fresh tensor. `owned` makes such a copy, once, at load.
Under `torch.compile` the checks are left out of the traced graph (they read data pointers, which a graph
cannot); the eager path, which tests run, keeps them.
"""

from __future__ import annotations

import torch

ALIGNMENT = 64
"""Bytes: the alignment of torch's CPU allocator, above the 32 that the AVX-512 INT8 kernel needs."""
INT8_K_MULTIPLE = 16
"""The INT8 kernel's row width K must be a multiple of this (inference.runtime.quantize pads narrower weights)."""


class KernelPreconditionError(ValueError):
    """A tensor breaks what a native kernel assumes: the message names the op, the tensor and the rule."""


def is_owned(t: torch.Tensor) -> bool:
    """Contiguous, in storage that torch's allocator owns (resizable storages are exactly those), at an
    aligned address."""
    return t.is_contiguous() and t.untyped_storage().resizable() and t.data_ptr() % ALIGNMENT == 0


def owned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when `is_owned(t)`, else a contiguous copy in fresh, aligned storage."""
    if is_owned(t):
        return t
    copy = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    copy.copy_(t)
    assert is_owned(copy) or t.device.type != "cpu"
    return copy


def _require(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, ndim: int) -> None:
    if t.dtype != dtype or t.dim() != ndim:
        raise KernelPreconditionError(
            f"{op}: {name} must be a {ndim}-D {dtype} tensor, got {t.dim()}-D {t.dtype} {tuple(t.shape)}"
        )
    if t.device.type != "cpu":
        raise KernelPreconditionError(f"{op}: {name} is on {t.device}; these are CPU kernels")
    if not t.is_contiguous():
        raise KernelPreconditionError(f"{op}: {name} {tuple(t.shape)} is not contiguous (strides {t.stride()})")
    if not t.untyped_storage().resizable():
        raise KernelPreconditionError(
            f"{op}: {name} {tuple(t.shape)} lives in storage torch does not own (a file, mmap or foreign "
            "buffer view): copy it with kernels.native.owned when it is loaded"
        )
    if t.data_ptr() % ALIGNMENT:
        raise KernelPreconditionError(
            f"{op}: {name} {tuple(t.shape)} is at an address {t.data_ptr() % ALIGNMENT} bytes past a "
            f"{ALIGNMENT}-byte boundary: copy it with kernels.native.owned when it is loaded"
        )


def _checking() -> bool:
    return not torch.compiler.is_compiling()


def int8_mm(x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """y_MN = x (q * scale)^T with bf16 x and scale, int8 q, on `aten._weight_int8pack_mm`."""
    if _checking():
        op = "_weight_int8pack_mm"
        _require(op, "x (activations)", x_MK, torch.bfloat16, 2)
        _require(op, "q (int8 weight)", q_NK, torch.int8, 2)
        _require(op, "scale", scale_N, torch.bfloat16, 1)
        N, K = q_NK.shape
        if x_MK.shape[1] != K or scale_N.shape[0] != N:
            raise KernelPreconditionError(
                f"{op}: shapes do not match: x {tuple(x_MK.shape)}, q {tuple(q_NK.shape)}, scale {tuple(scale_N.shape)}"
            )
        if K % INT8_K_MULTIPLE:
            raise KernelPreconditionError(
                f"{op}: q has K={K} inputs per row, not a multiple of {INT8_K_MULTIPLE} (the AVX-512 kernel "
                "crashes on such rows): pad the weight with zero columns"
            )
    return torch.ops.aten._weight_int8pack_mm(x_MK, q_NK, scale_N)
