"""The INT8 KV cache, per token and per channel: quantization error bounds, decoding close to the fp32
cache, and the memory it saves."""

import pytest
import torch
import torch.nn.functional as F

from inference.runtime.kv_cache import Int8LayerCache, calibrate_channel_scales, use_int8_kv_cache
from kernels.kv_int8 import quantize_per_token
from model.config import debug_tiny
from model.transformer import Transformer


def test_per_token_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 16) * 4
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 10, 1)
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def decode(model: Transformer, tokens: torch.Tensor):
    """Prefill 8 tokens, then one token per step; logits of every position, and the cache."""
    cache = model.new_cache(1)
    steps = [model(tokens[:, :8], 0, cache)] + [
        model(tokens[:, t : t + 1], t, cache) for t in range(8, tokens.shape[1])
    ]
    return torch.cat(steps, 1), cache


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_int8_kv_cache_decodes_like_the_fp32_cache(granularity):
    torch.manual_seed(0)
    model = Transformer(debug_tiny()).eval()
    tokens = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        ref, cache = decode(model, tokens)
        scales = calibrate_channel_scales(model, [torch.randint(0, 512, (4, 64))]) if granularity == "channel" else None
        use_int8_kv_cache(model, scales)
        out, cache8 = decode(model, tokens)
    assert isinstance(cache8[0], Int8LayerCache) and cache8[0].per_channel == (granularity == "channel")
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    assert kl < 1e-3 and (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    fp32_bytes = sum(c.k_BGSDh.nbytes + c.v_BGSDh.nbytes for c in cache)
    # Dh = 16: (16 + 4) / 64 bytes per token; per channel the scales do not grow with the cache
    assert sum(c.nbytes() for c in cache8) < (0.4 if granularity == "token" else 0.3) * fp32_bytes


def test_channel_scales_cover_the_calibration_keys_and_refuse_wrong_shapes():
    torch.manual_seed(0)
    model = Transformer(debug_tiny()).eval()
    tokens = torch.randint(0, 512, (2, 32))
    scales = calibrate_channel_scales(model, [tokens])
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        model(tokens, 0, cache)
    for (k_scale, v_scale), layer in zip(scales, cache, strict=True):
        # the largest key and value of each channel maps to exactly +-127
        torch.testing.assert_close(layer.k_BGSDh.abs().amax((0, 2)) / 127, k_scale)
        torch.testing.assert_close(layer.v_BGSDh.abs().amax((0, 2)) / 127, v_scale)
    G, Dh = scales[0][0].shape
    with pytest.raises(ValueError, match="per-channel KV scales must have shape"):
        Int8LayerCache((1, G, 8, Dh), (torch.ones(G, Dh + 1), torch.ones(G, Dh + 1)))
    with pytest.raises(ValueError, match="layers of KV scales"):
        use_int8_kv_cache(model, scales[:1])
