"""INT8 KV quantization: the reference against inference/runtime/kv_cache.py, its error bounds, and the Triton
kernels (interpreted on CPU), which must give the reference's exact bytes and scales."""

from __future__ import annotations

import pytest
import torch

from inference.runtime.kv_cache import Int8LayerCache
from kernels import kv_int8
from kernels.kv_int8 import (
    dequantize,
    dequantize_reference,
    dequantize_triton,
    quantize_per_channel,
    quantize_per_channel_reference,
    quantize_per_channel_triton,
    quantize_per_token,
    quantize_per_token_reference,
    quantize_per_token_triton,
)


def keys(B: int, G: int, T: int, Dh: int, seed: int = 0) -> torch.Tensor:
    """(B, G, T, Dh) with tokens and channels of different magnitudes, as a transposed (B, T, G, Dh) view
    the way attention produces them."""
    torch.manual_seed(seed)
    x_BTGD = torch.randn(B, T, G, Dh) * torch.rand(B, T, G, 1) * 4 * torch.linspace(0.2, 2, Dh)
    return x_BTGD.transpose(1, 2)


def per_channel_scale(x_BGTD: torch.Tensor) -> torch.Tensor:
    """The static (G, Dh) scale that covers x: absmax over batch and positions / 127."""
    return x_BGTD.abs().amax((0, 2)) / 127


def test_the_int8_layer_cache_stores_the_references_bytes():
    k_BGTD, v_BGTD = keys(2, 3, 5, 32), keys(2, 3, 5, 32) * 0.5
    cache = Int8LayerCache((2, 3, 8, 32))
    k_read, _ = cache.store(2, k_BGTD, v_BGTD)
    q_BGTD, scale_BGT1 = quantize_per_token_reference(k_BGTD)
    assert torch.equal(cache.k_q[:, :, 2:7], q_BGTD) and torch.equal(cache.k_scale[:, :, 2:7], scale_BGT1)
    assert torch.equal(k_read[:, :, 2:7], dequantize_reference(q_BGTD, scale_BGT1))


def test_per_token_error_is_at_most_half_a_step():
    x_BGTD = keys(2, 3, 17, 64)
    q_BGTD, scale_BGT1 = quantize_per_token_reference(x_BGTD)
    assert q_BGTD.dtype == torch.int8 and scale_BGT1.shape == (2, 3, 17, 1)
    assert (q_BGTD.abs().amax(-1) == 127).all()  # every token's absmax lands on the last step
    assert ((dequantize_reference(q_BGTD, scale_BGT1) - x_BGTD).abs() <= scale_BGT1 / 2 + 1e-6).all()


def test_per_channel_error_is_at_most_half_a_step_and_clips_beyond_the_calibration():
    x_BGTD = keys(2, 3, 17, 64)
    scale_GD = per_channel_scale(x_BGTD)
    q_BGTD = quantize_per_channel_reference(x_BGTD, scale_GD)
    error = (dequantize_reference(q_BGTD, scale_GD[:, None, :]) - x_BGTD).abs()
    assert (error <= scale_GD[:, None, :] / 2 + 1e-6).all()
    assert torch.equal(
        quantize_per_channel_reference(3 * x_BGTD, scale_GD).abs().amax((0, 2)),
        torch.full((3, 64), 127, dtype=torch.int8),
    )


def test_cpu_dispatch_is_the_reference(cpu_dispatch):
    x_BGTD = keys(1, 2, 9, 32)
    q_BGTD, scale_BGT1 = quantize_per_token(x_BGTD)
    reference_q, reference_scale = quantize_per_token_reference(x_BGTD)
    assert torch.equal(q_BGTD, reference_q) and torch.equal(scale_BGT1, reference_scale)
    scale_GD = per_channel_scale(x_BGTD)
    assert torch.equal(quantize_per_channel(x_BGTD, scale_GD), quantize_per_channel_reference(x_BGTD, scale_GD))
    x_hat = dequantize(q_BGTD, scale_BGT1, torch.bfloat16)
    assert torch.equal(x_hat, dequantize_reference(q_BGTD, scale_BGT1, torch.bfloat16))


def test_per_channel_scale_shape_is_checked():
    with pytest.raises(ValueError, match=r"is \(G, Dh\)"):
        quantize_per_channel(keys(1, 2, 3, 32), torch.ones(2, 16))


# (B, G, T, Dh): a decode step, a prefill, a head dim that is not a power of two, many rows per program
SHAPES = [(1, 2, 1, 64), (2, 3, 7, 32), (2, 1, 5, 48), (1, 4, 80, 16)]


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("B", "G", "T", "Dh"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_quantize_per_token_gives_the_reference_bytes(B, G, T, Dh, dtype):
    x_BGTD = keys(B, G, T, Dh).to(dtype)
    q_BGTD, scale_BGT1 = quantize_per_token_triton(x_BGTD)
    reference_q, reference_scale = quantize_per_token_reference(x_BGTD)
    assert torch.equal(q_BGTD, reference_q) and torch.equal(scale_BGT1, reference_scale)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize(("B", "G", "T", "Dh"), SHAPES)
def test_triton_per_channel_and_dequantize_give_the_reference(B, G, T, Dh):
    x_BGTD = keys(B, G, T, Dh)
    scale_GD = per_channel_scale(x_BGTD) * 0.7  # some values clip
    q_BGTD = quantize_per_channel_triton(x_BGTD, scale_GD)
    assert torch.equal(q_BGTD, quantize_per_channel_reference(x_BGTD, scale_GD))
    channel_scale = scale_GD[None, :, None, :]  # as Int8LayerCache keeps it
    assert torch.equal(dequantize_triton(q_BGTD, channel_scale), dequantize_reference(q_BGTD, channel_scale))
    q_BGTD, scale_BGT1 = quantize_per_token_reference(x_BGTD)
    cached_BGTD = q_BGTD[:, :, T // 2 :]  # a slice of a cache: strided along positions
    x_hat = dequantize_triton(cached_BGTD, scale_BGT1[:, :, T // 2 :], torch.float16)
    assert torch.equal(x_hat, dequantize_reference(cached_BGTD, scale_BGT1[:, :, T // 2 :], torch.float16))


@pytest.mark.usefixtures("triton_kernels")
def test_triton_rounds_halves_to_even_like_torch():
    x_BGTD = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 126.5, -126.5, 3.0, 200.0]).view(1, 1, 1, 10)
    q_BGTD = quantize_per_channel_triton(x_BGTD, torch.ones(1, 10))
    assert q_BGTD.flatten().tolist() == [0, 2, 2, 0, -2, 0, 126, -126, 3, 127]
    assert torch.equal(q_BGTD, quantize_per_channel_reference(x_BGTD, torch.ones(1, 10)))


def test_forced_dispatch_runs_the_kernels(forced_triton, monkeypatch):
    """The kernels give the reference's bytes, so which path ran is told by recording the kernel calls."""
    calls = []

    def recorded(kernel):
        def call(*args):
            calls.append(kernel.__name__)
            return kernel(*args)

        return call

    for kernel in (quantize_per_token_triton, quantize_per_channel_triton, dequantize_triton):
        monkeypatch.setattr(kv_int8, kernel.__name__, recorded(kernel))
    x_BGTD = keys(1, 2, 3, 32)
    q_BGTD, scale_BGT1 = quantize_per_token(x_BGTD)
    quantize_per_channel(x_BGTD, per_channel_scale(x_BGTD))
    assert torch.equal(dequantize(q_BGTD, scale_BGT1), dequantize_reference(q_BGTD, scale_BGT1))
    assert calls == ["quantize_per_token_triton", "quantize_per_channel_triton", "dequantize_triton"]
