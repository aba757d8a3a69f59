"""Triton as an optional dependency (the `gpu` extra), and the one rule for which path a kernel call takes.

Triton reads TRITON_INTERPRET when `jit` decorates a kernel, i.e. when a kernels module is first imported:
tests set it before that (tests/kernels/conftest.py) to run the kernels on CPU tensors in its interpreter.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError:  # without Triton the kernels below stay plain, never-launched functions
    triton = tl = None

jit = triton.jit if triton is not None else (lambda fn: fn)


def use_triton(x: torch.Tensor) -> bool:
    """Triton for CUDA tensors, or everywhere when FRUGAL_FORCE_TRITON=1 (with TRITON_INTERPRET=1 on CPU)."""
    wanted = x.is_cuda or os.environ.get("FRUGAL_FORCE_TRITON") == "1"
    if wanted and triton is None:
        raise ModuleNotFoundError("the Triton kernels need triton: pip install -e '.[gpu]'")
    return wanted
