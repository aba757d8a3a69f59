"""Decode attention over the INT8 cache: the reference against fp32 attention over the unquantized keys and
values (computed query by query, without a mask), the Triton kernel (interpreted on CPU) against the
reference, and the dispatcher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.attention_int8 import attention_int8, attention_int8_reference, attention_int8_triton
from kernels.kv_int8 import quantize_per_token_reference


def decode_inputs(B: int, H: int, G: int, T: int, S: int, Dh: int, start_pos: int, seed: int = 0):
    """q (B, H, T, Dh), fp32 k and v (B, G, S, Dh) and their INT8 cache (q, scale for k, then for v). Positions
    from start_pos + T on hold large garbage: nothing may read them."""
    torch.manual_seed(seed)
    q_BHTD = torch.randn(B, H, T, Dh)
    k_BGSD, v_BGSD = torch.randn(B, G, S, Dh), torch.randn(B, G, S, Dh)
    k_BGSD[:, :, start_pos + T :] = 1e4
    v_BGSD[:, :, start_pos + T :] = -1e4
    return q_BHTD, k_BGSD, v_BGSD, (*quantize_per_token_reference(k_BGSD), *quantize_per_token_reference(v_BGSD))


def fp32_attention(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, start_pos: int):
    """Query i attends, unmasked, to keys 0 .. start_pos + i; query head h to kv head h // (H / G)."""
    n_rep = q_BHTD.shape[1] // k_BGSD.shape[1]
    k_BHSD, v_BHSD = k_BGSD.repeat_interleave(n_rep, 1), v_BGSD.repeat_interleave(n_rep, 1)
    rows = []
    for i in range(q_BHTD.shape[2]):
        end = start_pos + i + 1
        rows.append(F.scaled_dot_product_attention(q_BHTD[:, :, i : i + 1], k_BHSD[:, :, :end], v_BHSD[:, :, :end]))
    return torch.cat(rows, 2)


# (B, H, G, T, S, Dh, start_pos): one decode step with GQA, T > 1 deep into the cache, the prefill (start 0),
# plain multi-head, a head dim off a power of two; S > start_pos + T and blocks of 32 keys cut mid-way
SHAPES = [
    (2, 4, 2, 1, 48, 32, 40),
    (1, 8, 2, 3, 100, 64, 90),
    (1, 4, 1, 5, 20, 32, 0),
    (2, 3, 3, 2, 40, 16, 33),
    (1, 6, 2, 4, 70, 48, 37),
]


@pytest.mark.parametrize(("B", "H", "G", "T", "S", "Dh", "start_pos"), SHAPES)
def test_int8_cache_attention_is_close_to_fp32_attention(B, H, G, T, S, Dh, start_pos):
    """Outputs are convex combinations of values quantized to within absmax / 254 (~0.015 for these
    Gaussians), plus what the keys' error moves the softmax weights."""
    q_BHTD, k_BGSD, v_BGSD, cache = decode_inputs(B, H, G, T, S, Dh, start_pos)
    o_BHTD = attention_int8_reference(q_BHTD, *cache, start_pos)
    expected_BHTD = fp32_attention(q_BHTD, k_BGSD, v_BGSD, start_pos)
    assert o_BHTD.shape == (B, H, T, Dh)
    assert (o_BHTD - expected_BHTD).abs().max() < 0.03
    assert (o_BHTD - expected_BHTD).abs().mean() < 0.008


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("B", "H", "G", "T", "S", "Dh", "start_pos"), SHAPES)
def test_triton_matches_reference_fp32(B, H, G, T, S, Dh, start_pos):
    q_BHTD, _, _, cache = decode_inputs(B, H, G, T, S, Dh, start_pos)
    o_BHTD = attention_int8_triton(q_BHTD, *cache, start_pos, block_s=32)
    torch.testing.assert_close(o_BHTD, attention_int8_reference(q_BHTD, *cache, start_pos), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("B", "H", "G", "T", "S", "Dh", "start_pos"), SHAPES[:2])
def test_triton_matches_reference_fp16(B, H, G, T, S, Dh, start_pos):
    """fp16 queries, probabilities and dequantized values in the products, fp32 accumulation, fp16 output:
    within a few fp16 steps of outputs of order 1."""
    q_BHTD, _, _, cache = decode_inputs(B, H, G, T, S, Dh, start_pos)
    q_BHTD = q_BHTD.half()
    o_BHTD = attention_int8_triton(q_BHTD, *cache, start_pos, block_s=32)
    assert o_BHTD.dtype == torch.float16
    reference_BHTD = attention_int8_reference(q_BHTD, *cache, start_pos)
    torch.testing.assert_close(o_BHTD.float(), reference_BHTD.float(), rtol=0, atol=3e-3)


def test_cpu_dispatch_is_the_reference(cpu_dispatch):
    q_BHTD, _, _, cache = decode_inputs(1, 4, 2, 3, 30, 32, 20)
    assert torch.equal(attention_int8(q_BHTD, *cache, 20), attention_int8_reference(q_BHTD, *cache, 20))


def test_forced_dispatch_runs_the_kernel(forced_triton):
    q_BHTD, _, _, cache = decode_inputs(1, 4, 2, 3, 30, 32, 20)
    assert torch.equal(attention_int8(q_BHTD, *cache, 20), attention_int8_triton(q_BHTD, *cache, 20))


def test_inconsistent_shapes_are_refused():
    q_BHTD, _, _, cache = decode_inputs(1, 4, 2, 3, 30, 32, 20)
    with pytest.raises(ValueError, match="need a cache of 31, not 30"):
        attention_int8(q_BHTD, *cache, 28)
    with pytest.raises(ValueError, match="3 query heads cannot share 2 kv heads"):
        attention_int8(q_BHTD[:, :3], *cache, 20)


def test_scores_use_one_over_sqrt_head_dim():
    """Two keys with q . k = 0 and sqrt(Dh), so scores 0 and 1: their values weigh 1 : e."""
    Dh = 16
    q_BHTD = torch.zeros(1, 1, 1, Dh)
    q_BHTD[..., 0] = 1.0
    k_BGSD = torch.zeros(1, 1, 2, Dh)
    k_BGSD[0, 0, 1, 0] = math.sqrt(Dh)
    v_BGSD = torch.zeros(1, 1, 2, Dh)
    v_BGSD[0, 0, :, 1] = torch.tensor([0.0, 1.0])
    cache = (*quantize_per_token_reference(k_BGSD), *quantize_per_token_reference(v_BGSD))
    o_BHTD = attention_int8_reference(q_BHTD, *cache, 1)
    torch.testing.assert_close(o_BHTD[0, 0, 0, 1], torch.tensor(math.e / (1 + math.e)), rtol=1e-6, atol=1e-6)
