"""One forward of a Frugal Transformer over a packed batch: B sequences, each bringing its own run of new
tokens at its own positions (a prefill chunk, one decoding token, or a speculative round's last token and
proposals), with keys and values kept in a paged cache (inference.runtime.engine.paged_cache).

The N new tokens are packed: embeddings, norms, projections, feed-forwards and experts run once over all
of them, which is where batching pays. Attention is the only per-sequence part: each layer scatters the new
keys and values to their cache slots, gathers each sequence's blocks through its block table, lays the
queries out as (B, T) with T the longest run, and masks key j of query (b, t) unless j <= position(b, t).
A padding query sits at position 0 and sees key 0 only, so its (discarded) output stays finite.

On a GPU, an INT8 cache is attended in place by kernels/paged_attention_int8.py (Triton), through the
block tables, without gathering or dequantizing it first.

The model's own modules are called (its attention projections, norms, MoE), so quantized layers and the
INT8 caches work here exactly as in the eager path (model.transformer), which this is tested against.

Shape legend: N packed new tokens, B sequences, T longest run, M blocks per table, S = M * block size,
H query heads, G kv heads, Dh head dim, D model width, V vocabulary, L rows whose logits are wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference.runtime.engine.experts import GroupedExperts
from inference.runtime.engine.paged_cache import PagedKVCache
from kernels.dispatch import use_triton
from kernels.paged_attention_int8 import paged_attention_int8
from model.transformer import Attention, Transformer, apply_rope


@dataclass(slots=True)
class Run:
    """One sequence's part of a step: `tokens` at positions start .. start + len(tokens) - 1, cached in the
    blocks of `block_table` (which covers every position up to the last)."""

    tokens: list[int]
    start: int
    block_table: list[int]


@dataclass(slots=True)
class Batch:
    tokens_N: torch.Tensor
    positions_N: torch.Tensor
    slots_N: torch.Tensor
    """Cache slot of each new token: block * block_size + offset."""
    block_tables_BM: torch.Tensor
    """Padded with block 0; the mask hides the padding."""
    padded_N: torch.Tensor
    """Index of each new token in the (B * T) layout of the queries."""
    positions_BT: torch.Tensor
    ends: list[int]
    """Packed index one past each run's last token."""

    @classmethod
    def pack(cls, runs: list[Run], block_size: int) -> Batch:
        assert runs and all(r.tokens for r in runs)
        T = max(len(r.tokens) for r in runs)
        M = max(len(r.block_table) for r in runs)
        tokens, positions, slots, padded, ends = [], [], [], [], []
        positions_BT = torch.zeros(len(runs), T, dtype=torch.long)
        tables = torch.zeros(len(runs), M, dtype=torch.long)
        for b, r in enumerate(runs):
            pos = range(r.start, r.start + len(r.tokens))
            assert (pos[-1] // block_size) < len(r.block_table), "the block table does not cover the run"
            tokens += r.tokens
            positions += pos
            slots += [r.block_table[p // block_size] * block_size + p % block_size for p in pos]
            padded += range(b * T, b * T + len(r.tokens))
            positions_BT[b, : len(r.tokens)] = torch.tensor(pos)
            tables[b, : len(r.block_table)] = torch.tensor(r.block_table)
            ends.append(len(tokens))
        as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return cls(as_long(tokens), as_long(positions), as_long(slots), tables, as_long(padded), positions_BT, ends)


def _attention(attn: Attention, x_ND: torch.Tensor, batch: Batch, cache: PagedKVCache, layer: int, cos, sin):
    N = x_ND.shape[0]
    H, G, Dh = attn.n_heads, attn.n_kv, attn.head_dim
    q_NHDh = apply_rope(attn.wq(x_ND).view(N, H, Dh), cos, sin)
    k_NGDh = apply_rope(attn.wk(x_ND).view(N, G, Dh), cos, sin)
    cache.write(layer, batch.slots_N, k_NGDh, attn.wv(x_ND).view(N, G, Dh))
    B, T = batch.positions_BT.shape
    q_BHTDh = q_NHDh.new_zeros(B * T, H, Dh).index_copy_(0, batch.padded_N, q_NHDh).view(B, T, H, Dh).transpose(1, 2)
    if cache.kind != "fp32" and use_triton(q_BHTDh):  # a GPU: attend over the INT8 blocks where they lie
        out = paged_attention_int8(q_BHTDh, cache.k[layer], cache.k_scale[layer], cache.v[layer],
                                   cache.v_scale[layer], batch.block_tables_BM, batch.positions_BT)  # fmt: skip
        return attn.wo(out.transpose(1, 2).reshape(B * T, H * Dh)[batch.padded_N])
    k_BGSDh, v_BGSDh = cache.read(layer, batch.block_tables_BM)
    S = k_BGSDh.shape[2]
    allowed_B1TS = torch.arange(S)[None, None, None, :] <= batch.positions_BT[:, None, :, None]
    out = F.scaled_dot_product_attention(
        q_BHTDh, k_BGSDh.to(q_BHTDh.dtype), v_BGSDh.to(q_BHTDh.dtype), attn_mask=allowed_B1TS, enable_gqa=G != H
    )
    return attn.wo(out.transpose(1, 2).reshape(B * T, H * Dh)[batch.padded_N])


GROUPED_MAX_TOKENS = 64
"""Up to this many tokens a step computes MoE experts grouped (inference.runtime.engine.experts: every expert for
every token, in a few large products); beyond, prompt chunks use the per-expert loop, where FLOPs dominate."""


def _layer(block, x_ND, batch: Batch, cache: PagedKVCache, layer: int, cos, sin, grouped: dict) -> torch.Tensor:
    """One transformer block over the packed tokens; `layer` is the block's layer in `cache`."""
    x_ND = x_ND + _attention(block.attn, block.attn_norm(x_ND), batch, cache, layer, cos, sin)
    h_ND = block.ffn_norm(x_ND)
    ffn = grouped.get(id(block.ffn))
    return x_ND + (ffn(h_ND) if ffn is not None else block.ffn(h_ND[None])[0])


def _rope(model: Transformer, batch: Batch):
    """cos, sin (N, 1, Dh / 2): one angle per token, all heads."""
    return model.rope_cos[batch.positions_N][:, None, :], model.rope_sin[batch.positions_N][:, None, :]


@torch.no_grad()
def forward(
    model: Transformer,
    batch: Batch,
    cache: PagedKVCache,
    logits_at: list[int],
    experts: dict[int, GroupedExperts] | None = None,
    return_hidden: bool = False,
):
    """Logits (L, V) of the packed tokens at indices `logits_at` (none: an empty tensor, and no head).
    experts: GroupedExperts by id of their MoE layer, used for steps of few tokens. return_hidden: (logits, h_ND),
    the final hidden state of every packed token through the final norm (where MTP module 1 starts)."""
    x_ND = model.embed(batch.tokens_N)
    cos, sin = _rope(model, batch)
    grouped = experts if experts and x_ND.shape[0] <= GROUPED_MAX_TOKENS else {}
    for i, block in enumerate(model.layers):
        x_ND = _layer(block, x_ND, batch, cache, i, cos, sin, grouped)
    if return_hidden:
        h_ND = model.norm(x_ND)
        logits = model.lm_head(h_ND[torch.tensor(logits_at, dtype=torch.long)]).float()
        return logits, h_ND
    if not logits_at:
        return x_ND.new_zeros(0, model.config.vocab_size)
    return model.lm_head(model.norm(x_ND[torch.tensor(logits_at)])).float()


@torch.no_grad()
def mtp_forward(
    model: Transformer,
    depth: int,
    batch: Batch,
    h_prev_ND: torch.Tensor,
    cache: PagedKVCache,
    logits_at: list[int],
    experts: dict[int, GroupedExperts] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP module `depth` (1-based; layer depth - 1 of `cache`) over the packed tokens, each the token `depth`
    positions ahead of its position, with h_prev_ND the previous depth's hidden states there: (h_ND, logits (L, V))."""
    module = model.mtp[depth - 1]
    x_ND = module.combine(h_prev_ND, model.embed(batch.tokens_N))
    cos, sin = _rope(model, batch)
    grouped = experts if experts and x_ND.shape[0] <= GROUPED_MAX_TOKENS else {}
    x_ND = _layer(module.block, x_ND, batch, cache, depth - 1, cos, sin, grouped)
    return x_ND, model.lm_head(module.norm(x_ND[torch.tensor(logits_at, dtype=torch.long)])).float()
