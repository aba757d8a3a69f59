"""The paged INT8 attention kernel (Triton, in its interpreter here) against its torch reference, and the
reference against the engine's CPU path (gather, dequantize, SDPA), for both scale modes, ragged runs of
queries, scattered block tables and grouped-query heads."""

import pytest
import torch
import torch.nn.functional as F

from inference.runtime.engine.paged_cache import PagedKVCache
from kernels.paged_attention_int8 import paged_attention_int8_reference, paged_attention_int8_triton


def setup(kind: str, block_size: int, seed: int = 0):
    torch.manual_seed(seed)
    G, Dh, H, NB = 2, 32, 4, 12
    scales = [(torch.rand(G, Dh) * 0.05 + 0.01, torch.rand(G, Dh) * 0.05 + 0.01)] if kind == "int8-channel" else None
    cache = PagedKVCache(1, NB, block_size, G, Dh, kind, channel_scales=scales)
    cache.zero_blocks(list(range(NB)))
    tables = torch.tensor([[5, 2, 9], [7, 4, 0], [11, 3, 1]])  # row 1 pads with block 0
    lengths = [3 * block_size - 1, block_size + 2, 2 * block_size + 3]  # positions held after this step
    runs = [1, 4, 3]  # new queries per sequence (the last ones of each)
    for b, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = tables[b, pos // block_size] * block_size + pos % block_size
        cache.write(0, slots, torch.randn(n, G, Dh), torch.randn(n, G, Dh))
    T = max(runs)
    positions = torch.zeros(3, T, dtype=torch.long)
    for b, (n, t) in enumerate(zip(lengths, runs)):
        positions[b, :t] = torch.arange(n - t, n)
    return cache, tables, positions, torch.randn(3, H, T, Dh)


@pytest.mark.parametrize("kind", ["int8", "int8-channel"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_the_reference_is_the_engines_cpu_path(kind, block_size):
    cache, tables, positions, q = setup(kind, block_size)
    ref = paged_attention_int8_reference(q, cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0], tables,
                                         positions)  # fmt: skip
    k, v = cache.read(0, tables)
    mask = torch.arange(k.shape[2])[None, None, None, :] <= positions[:, None, :, None]
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(ref, sdpa, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int8-channel"])
@pytest.mark.parametrize("block_size", [4, 16, 32])
def test_the_triton_kernel_matches_the_reference(triton_kernels, kind, block_size):
    cache, tables, positions, q = setup(kind, block_size, seed=1)
    args = (cache.k[0], cache.k_scale[0], cache.v[0], cache.v_scale[0], tables, positions)
    got = paged_attention_int8_triton(q, *args)
    want = paged_attention_int8_reference(q, *args)
    valid = torch.zeros_like(positions, dtype=torch.bool)
    valid[0, :1], valid[1, :4], valid[2, :3] = True, True, True  # padding queries' outputs are discarded
    assert torch.allclose(got.transpose(1, 2)[valid], want.transpose(1, 2)[valid], atol=2e-3, rtol=1e-3)
