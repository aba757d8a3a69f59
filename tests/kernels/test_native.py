"""kernels.native: owned storage, and the preconditions of torch's private INT8 CPU op, checked before the
op runs (so these tests run the refusals in-process: nothing reaches a kernel that could crash)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import native
from tests.conftest import cpu_capabilities, run_under_capability


def misaligned(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A copy of t inside a larger fresh buffer, `offset_bytes` past its (64-byte aligned) start."""
    n = offset_bytes // t.element_size()
    buffer = torch.zeros(t.numel() + n + 64, dtype=t.dtype)
    view = buffer[n : n + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 64 == offset_bytes
    return view


def int8_operands(M=5, N=64, K=128):
    torch.manual_seed(0)
    x = torch.randn(M, K).to(torch.bfloat16)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    return x, q, torch.rand(N).to(torch.bfloat16)


def test_owned_keeps_fresh_tensors_and_copies_views_files_and_foreign_buffers(tmp_path):
    fresh = torch.randn(4, 8)
    assert native.owned(fresh) is fresh
    save_file({"w": torch.arange(100, dtype=torch.int8)}, str(tmp_path / "w.safetensors"))
    from_file = load_file(str(tmp_path / "w.safetensors"))["w"]
    cases = {
        "file": from_file,
        "offset view": misaligned(torch.arange(100, dtype=torch.int8), 8),
        "numpy": torch.from_numpy(np.arange(12.0)),
        "transposed": torch.randn(8, 4).t(),
    }
    for name, t in cases.items():
        assert not native.is_owned(t), name
        copy = native.owned(t)
        assert native.is_owned(copy) and torch.equal(copy, t) and copy.data_ptr() != t.data_ptr(), name


def test_int8_mm_matches_the_dequantized_product():
    x, q, scale = int8_operands()
    reference = x.float() @ (q.float() * scale.float()[:, None]).T
    y = native.int8_mm(x, q, scale)
    assert (y.float() - reference).abs().max() < 0.01 * reference.abs().max()


@pytest.mark.parametrize(
    ("tensor", "broken", "message"),
    [
        ("q", lambda t: misaligned(t, 40), "q (int8 weight) (64, 128) is at an address 40 bytes past"),
        ("x", lambda t: misaligned(t, 16), "x (activations) (5, 128) is at an address 16 bytes past"),
        ("scale", lambda t: misaligned(t, 2), "scale (64,) is at an address 2 bytes past"),
        ("q", lambda t: torch.from_numpy(t.numpy().copy()), "q (int8 weight) (64, 128) lives in storage torch does"),
        ("x", lambda t: t.float(), "x (activations) must be a 2-D torch.bfloat16 tensor, got 2-D torch.float32"),
        ("q", lambda t: t.t().contiguous().t(), "q (int8 weight) (64, 128) is not contiguous"),
    ],
)
def test_int8_mm_refuses_what_the_kernel_assumes_and_names_the_tensor(tensor, broken, message):
    operands = dict(zip(("x", "q", "scale"), int8_operands()))
    operands[tensor] = broken(operands[tensor])
    with pytest.raises(native.KernelPreconditionError, match=re.escape(message)):
        native.int8_mm(operands["x"], operands["q"], operands["scale"])


def test_int8_mm_refuses_rows_whose_width_is_not_a_multiple_of_16():
    x, q, scale = int8_operands(K=40)
    with pytest.raises(native.KernelPreconditionError, match="K=40 inputs per row, not a multiple of 16"):
        native.int8_mm(x, q, scale)


PROBE = """
import json, sys, torch
from kernels import native
from tests.kernels.test_native import int8_operands, misaligned
x, q, scale = int8_operands()
bad = misaligned(q, 8)
if sys.argv[1] == "guarded":
    try:
        native.int8_mm(x, bad, scale)
    except native.KernelPreconditionError as e:
        print(json.dumps({"refused": str(e)}))
else:
    torch.ops.aten._weight_int8pack_mm(x, bad, scale)
    print(json.dumps({"ran": True}))
"""


@pytest.mark.skipif("avx512" not in cpu_capabilities(), reason="this CPU has no AVX-512")
def test_the_guard_refuses_what_crashes_the_raw_op_under_avx512():
    """The measured fact the module stands on (torch 2.13): a weight 8 bytes past a 16-byte boundary kills the
    process in the raw op under avx512, and the guarded call refuses it with a message instead."""
    raw = run_under_capability("avx512", ["-c", PROBE, "raw"], expect_signal=True)
    assert raw.returncode == -11, raw.stdout + raw.stderr  # SIGSEGV: if torch fixed this, native.py can relax
    guarded = run_under_capability("avx512", ["-c", PROBE, "guarded"])
    assert "at an address 8 bytes past a 64-byte boundary" in json.loads(guarded.stdout)["refused"]
