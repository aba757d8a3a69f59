"""W4A16: the nibble packing, the reference against inference/runtime/quantize.py's Int4Weight and against fp32,
the Triton kernel (interpreted on CPU) against the reference, and the dispatcher.

The interpreter runs tl.dot through numpy, which has no bfloat16 (triton-lang/triton#11584): the kernel is
checked here with fp32 and fp16 activations only."""

from __future__ import annotations

import pytest
import torch

from inference.runtime.quantize import quantize_int4
from kernels.w4a16 import (
    dequantize_int4,
    pack_int4,
    unpack_int4,
    w4a16_matmul,
    w4a16_matmul_reference,
    w4a16_matmul_triton,
)


def quantized_weight(N: int, K: int, group_size: int, seed: int = 0):
    """(packed_NP, scale_NG, zero_NG, w_NK): an asymmetric INT4 weight with per-row offsets, and the fp32 one."""
    torch.manual_seed(seed)
    w_NK = torch.randn(N, K) * 0.05 + torch.randn(N, 1) * 0.02
    q = quantize_int4(w_NK, group_size)
    return pack_int4(q.q_NK), q.scale_NG, q.zero_NG, w_NK


def test_pack_puts_even_inputs_in_the_low_nibble():
    q_NK = torch.tensor([[1, 2, 15, 0], [7, 8, 0, 15]], dtype=torch.uint8)
    assert pack_int4(q_NK).tolist() == [[0x21, 0x0F], [0x87, 0xF0]]


def test_pack_unpack_round_trip():
    torch.manual_seed(0)
    q_NK = torch.randint(0, 16, (37, 96), dtype=torch.uint8)
    packed_NP = pack_int4(q_NK)
    assert packed_NP.shape == (37, 48) and packed_NP.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed_NP), q_NK)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_matches_int4_weight(group_size, symmetric):
    torch.manual_seed(0)
    q = quantize_int4(torch.randn(24, 256), group_size, symmetric)
    w_NK = dequantize_int4(pack_int4(q.q_NK), q.scale_NG, q.zero_NG, group_size)
    assert torch.equal(w_NK, q.dequantize())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_reference_error_is_bounded_by_half_a_step_per_input(group_size):
    """|x (W_q - W)^T| <= sum_k |x_k| s_k / 2, since each dequantized weight is within half a step."""
    packed_NP, scale_NG, zero_NG, w_NK = quantized_weight(40, 256, group_size)
    x_MK = torch.randn(5, 256)
    error_MN = (w4a16_matmul_reference(x_MK, packed_NP, scale_NG, zero_NG, group_size) - x_MK @ w_NK.T).abs()
    bound_MN = x_MK.abs() @ (scale_NG.repeat_interleave(group_size, 1) / 2).T
    assert (error_MN <= bound_MN + 1e-5).all()


def test_cpu_dispatch_is_the_reference(cpu_dispatch):
    packed_NP, scale_NG, zero_NG, _ = quantized_weight(48, 128, 64)
    for dtype in (torch.float32, torch.bfloat16):
        x_MK = torch.randn(3, 128).to(dtype)
        y_MN = w4a16_matmul(x_MK, packed_NP, scale_NG, zero_NG, 64)
        assert y_MN.dtype == dtype
        assert torch.equal(y_MN, w4a16_matmul_reference(x_MK, packed_NP, scale_NG, zero_NG, 64))


def test_mismatched_inputs_are_refused():
    packed_NP, scale_NG, zero_NG, _ = quantized_weight(16, 128, 64)
    with pytest.raises(ValueError, match="x has 96 inputs"):
        w4a16_matmul(torch.randn(2, 96), packed_NP, scale_NG, zero_NG, 64)


# (M, N, K, group_size): one row (decode) and several M tiles; N off the 64-wide tile; 1 to 4 groups per row
SHAPES = [(1, 48, 128, 32), (19, 70, 192, 64), (33, 64, 256, 128), (4, 130, 128, 128)]


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("M", "N", "K", "group_size"), SHAPES)
def test_triton_matches_reference_fp32(M, N, K, group_size):
    packed_NP, scale_NG, zero_NG, _ = quantized_weight(N, K, group_size, seed=M)
    x_MK = torch.randn(M, K)
    y_MN = w4a16_matmul_triton(x_MK, packed_NP, scale_NG, zero_NG, group_size)
    reference_MN = w4a16_matmul_reference(x_MK, packed_NP, scale_NG, zero_NG, group_size)
    torch.testing.assert_close(y_MN, reference_MN, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("M", "N", "K", "group_size"), SHAPES)
def test_triton_matches_reference_fp16(M, N, K, group_size):
    """The kernel rounds each dequantized weight to fp16 before the product (the reference keeps fp32), and
    both round y to fp16: within two fp16 steps (2^-10 relative) of the largest output."""
    packed_NP, scale_NG, zero_NG, _ = quantized_weight(N, K, group_size, seed=M)
    x_MK = torch.randn(M, K).half()
    y_MN = w4a16_matmul_triton(x_MK, packed_NP, scale_NG, zero_NG, group_size)
    reference_MN = w4a16_matmul_reference(x_MK, packed_NP, scale_NG, zero_NG, group_size)
    assert y_MN.dtype == torch.float16
    scale = reference_MN.float().abs().max().item()
    torch.testing.assert_close(y_MN.float(), reference_MN.float(), rtol=0, atol=2e-3 * scale)


def test_forced_dispatch_runs_the_kernel(forced_triton):
    packed_NP, scale_NG, zero_NG, _ = quantized_weight(40, 128, 32)
    x_MK = torch.randn(6, 128)
    y_MN = w4a16_matmul(x_MK, packed_NP, scale_NG, zero_NG, 32)
    assert torch.equal(y_MN, w4a16_matmul_triton(x_MK, packed_NP, scale_NG, zero_NG, 32))


@pytest.mark.usefixtures("triton_kernels")
def test_kernel_refuses_group_sizes_it_cannot_tile():
    packed_NP, scale_NG, zero_NG, _ = quantized_weight(16, 96, 32)
    scale_NG, zero_NG = scale_NG[:, :2], zero_NG[:, :2]
    with pytest.raises(ValueError, match="power-of-two group size >= 16, not 48"):
        w4a16_matmul_triton(torch.randn(2, 96), packed_NP, scale_NG, zero_NG, 48)
