"""The Frugal transformer in plain torch: RMSNorm, RoPE, grouped-query causal attention with a KV cache,
SwiGLU feed-forwards, and a DeepSeekMoE feed-forward (shared + fine-grained routed experts) whose router
does auxiliary-loss-free balancing and optional top-p dynamic routing.

This module is the reference: the DeepSpeed training path swaps the routed experts for DeepSpeed's MoE
layer and must match it. Shape legend: B batch, T new positions, S cached + new positions, D d_model,
H query heads, G key/value heads, Dh head dim, N tokens (B*T), E routed experts, K experts per token,
F expert hidden width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim / 2): rotation angle pos * theta^(-2i / head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHTDh: torch.Tensor, cos_TDh2: torch.Tensor, sin_TDh2: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of features by its position's angle."""
    x1, x2 = x_BHTDh[..., 0::2].float(), x_BHTDh[..., 1::2].float()
    out = torch.stack((x1 * cos_TDh2 - x2 * sin_TDh2, x1 * sin_TDh2 + x2 * cos_TDh2), dim=-1)
    return out.flatten(-2).type_as(x_BHTDh)


@dataclass
class LayerCache:
    """Keys and values of the positions seen so far, for incremental decoding."""

    k_BGSDh: torch.Tensor
    v_BGSDh: torch.Tensor

    def store(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions start .. start + T - 1; return keys and values of positions 0 .. start + T - 1."""
        end = start + k.shape[2]
        self.k_BGSDh[:, :, start:end] = k
        self.v_BGSDh[:, :, start:end] = v
        return self.k_BGSDh[:, :, :end], self.v_BGSDh[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv = config.n_heads, config.n_kv_heads or config.n_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x_BTD, cos, sin, start_pos=0, cache: LayerCache | None = None, key_mask_BS=None) -> torch.Tensor:
        """key_mask_BS (bool, True = a real token) masks the left padding of a batch of prompts; a padding
        position attends to itself only, so its (unused) outputs stay finite."""
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.store(start_pos, k, v)
        repeat = self.n_heads // self.n_kv
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if key_mask_BS is None and (start_pos == 0 or T == 1):  # one new query sees every cached key
            out = F.scaled_dot_product_attention(q, k, v, is_causal=start_pos == 0)
        else:  # query i sits at position start_pos + i and sees keys 0 .. start_pos + i
            S = start_pos + T
            allowed = torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(diagonal=start_pos)
            if key_mask_BS is not None:
                itself_TS = torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(start_pos).triu(start_pos)
                allowed = allowed & (key_mask_BS[:, None, None, :S] | itself_TS)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class Routing:
    """Which experts each token uses: indices, combine weights, and a mask of used slots."""

    expert_NK: torch.Tensor  # int64
    weight_NK: torch.Tensor  # combine weights, zero on unused slots, each row sums to 1
    used_NK: torch.Tensor  # bool: dynamic routing leaves slots unused
    scores_NE: torch.Tensor  # router scores (softmax or sigmoid), before the selection bias

    def load_E(self, n_experts: int) -> torch.Tensor:
        """Tokens routed to each expert."""
        return torch.bincount(self.expert_NK[self.used_NK], minlength=n_experts).float()


def route(logits_NE: torch.Tensor, bias_E: torch.Tensor, config: ModelConfig) -> Routing:
    """The routing rule shared by the reference router and the DeepSpeed gate (model.moe_deepspeed).

    Selection uses score + bias; combination uses the unbiased scores of the chosen experts, normalised
    to sum to 1 (the gating weights). With top_p, the top_k selected experts are candidates: taking them
    by gating weight, largest first, a token uses the fewest whose weights sum to at least top_p, so a
    token whose first expert carries most of the weight uses fewer experts. (Over the candidates, not all
    experts: with sigmoid scores spread over many experts no single one would ever reach p.)
    """
    logits_NE = logits_NE.float()
    scores_NE = logits_NE.softmax(-1) if config.score_func == "softmax" else logits_NE.sigmoid()
    _, expert_NK = (scores_NE + bias_E).topk(config.top_k, dim=-1)
    chosen_NK = scores_NE.gather(-1, expert_NK)
    used_NK = torch.ones_like(expert_NK, dtype=torch.bool)
    if config.top_p is not None:
        probs_NK = chosen_NK / chosen_NK.sum(-1, keepdim=True).clamp_min(1e-20)
        sorted_NK, order_NK = probs_NK.sort(-1, descending=True)
        before_NK = sorted_NK.cumsum(-1) - sorted_NK  # mass of the larger candidates
        used_NK = torch.zeros_like(used_NK).scatter(-1, order_NK, before_NK < config.top_p)
    chosen_NK = chosen_NK * used_NK
    weight_NK = chosen_NK / chosen_NK.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(expert_NK, weight_NK, used_NK, scores_NE)


def balance_step(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """One auxiliary-loss-free balancing step, in place: -rate for experts above the mean load, +rate below."""
    bias_E += rate * torch.sign(load_E.mean() - load_E)


def sequence_balance_loss(routing: Routing, B: int, T: int, config: ModelConfig) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise loss: alpha * sum_i f_i * P_i per sequence, averaged, where f_i is
    E/(K T) times the tokens routed to expert i and P_i the mean normalised score of expert i."""
    E, K = config.n_routed_experts, config.top_k
    chosen = torch.zeros(B * T, E, device=routing.scores_NE.device)
    chosen_BTE = chosen.scatter_(1, routing.expert_NK, routing.used_NK.float()).view(B, T, E)
    f_BE = chosen_BTE.sum(1) * E / (K * T)
    probs_BTE = (routing.scores_NE / routing.scores_NE.sum(-1, keepdim=True)).view(B, T, E)
    return config.seq_aux_loss_coef * (f_BE * probs_BTE.mean(1)).sum(-1).mean()


class Router(nn.Module):
    """DeepSeek-style router.

    Selection uses score + bias; combination uses the unbiased scores of the chosen experts, normalised
    to sum to 1. The bias is not trained by gradients: after each step, `update_bias(load)` moves it by
    -gamma for experts above the mean load and +gamma below (auxiliary-loss-free balancing, DeepSeek-V3).
    Dynamic routing (top_p): of its top_k candidates, a token uses the fewest whose gating weights,
    largest first, sum to at least top_p, so confident tokens use fewer experts (see `route`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.randn(config.n_routed_experts, config.d_model) * config.d_model**-0.5)
        self.register_buffer("bias", torch.zeros(config.n_routed_experts), persistent=True)

    def forward(self, x_ND: torch.Tensor) -> Routing:
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        return route(logits_NE, self.bias, self.config)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """One balancing step: load_E is the tokens per expert seen this step (summed over ranks)."""
        balance_step(self.bias, load_E, self.config.bias_update_rate)


class MoE(nn.Module):
    """Shared experts (always on) plus routed fine-grained experts, computed expert by expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.router = Router(config)
        E, F_, D = config.n_routed_experts, config.d_expert, config.d_model
        self.w1_EFD = nn.Parameter(torch.randn(E, F_, D) * D**-0.5)
        self.w3_EFD = nn.Parameter(torch.randn(E, F_, D) * D**-0.5)
        self.w2_EDF = nn.Parameter(torch.randn(E, D, F_) * F_**-0.5)
        self.shared = SwiGLU(D, F_ * config.n_shared_experts) if config.n_shared_experts else None
        self.last_routing: Routing | None = None
        self.aux_loss = torch.zeros(())
        self.quantized: nn.ModuleList | None = None
        """Set by inference.runtime.quantize: per expert, quantized (w1, w3, w2) replacing the weight stacks."""

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        routing = self.router(x_ND)
        out_ND = torch.zeros_like(x_ND)
        used_NK = routing.used_NK
        # few tokens (decoding): visit only the experts they chose, not all E
        few = x_ND.shape[0] <= 16
        experts = routing.expert_NK[used_NK].unique().tolist() if few else range(self.config.n_routed_experts)
        for e in experts:
            token_idx, slot = torch.nonzero((routing.expert_NK == e) & used_NK, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y = self._expert(e, x_ND[token_idx])
            out_ND.index_add_(0, token_idx, y * routing.weight_NK[token_idx, slot, None].type_as(y))
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        self.last_routing = routing
        cfg = self.config
        self.aux_loss = sequence_balance_loss(routing, B, T, cfg) if cfg.seq_aux_loss_coef else torch.zeros(())
        return out_ND.view(B, T, D)

    def _expert(self, e: int, h_ND: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            w1, w3, w2 = self.quantized[e]
            return w2(F.silu(w1(h_ND)) * w3(h_ND))
        return F.linear(F.silu(F.linear(h_ND, self.w1_EFD[e])) * F.linear(h_ND, self.w3_EFD[e]), self.w2_EDF[e])

    @property
    def bias(self) -> torch.Tensor:
        return self.router.bias

    def update_bias(self, load_E: torch.Tensor) -> None:
        self.router.update_bias(load_E)


class Block(nn.Module):
    """Layer `layer` of the model; layer n_layers + k - 1 is MTP module k's block (ModelConfig.is_moe_layer)."""

    def __init__(self, config: ModelConfig, layer: int, moe_layer: Callable[[ModelConfig], nn.Module] = MoE):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = moe_layer(config) if config.is_moe_layer(layer) else SwiGLU(config.d_model, config.d_ff)

    def forward(self, x, cos, sin, start_pos=0, cache=None, key_mask_BS=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, start_pos, cache, key_mask_BS)
        return x + self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 section 2.2). At position i, depth k combines module k-1's
    hidden state h^{k-1}_i (the main model's, through its final norm, for k = 1) with the embedding of token
    t_{i+k}:  h'_i = W [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],  h^k = Block(h'),  and predicts t_{i+k+1} with
    the shared output head over RMSNorm(h^k_i). The embedding and head are the main model's; the block has its
    own attention (and KV cache) over positions of this depth. Names follow the checkpoints of DeepSeek-V3 and
    GLM-4.5 (enorm, hnorm, eh_proj, shared_head.norm), and so does the order of the concatenation."""

    def __init__(self, config: ModelConfig, moe_layer: Callable[[ModelConfig], nn.Module] = MoE):
        super().__init__()
        D = config.d_model
        self.enorm = RMSNorm(D, config.norm_eps)
        self.hnorm = RMSNorm(D, config.norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(config, config.n_layers, moe_layer)
        self.norm = RMSNorm(D, config.norm_eps)
        """The norm before the shared head (shared_head.norm in DeepSeek-V3 / GLM-4.5 checkpoints)."""

    def combine(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))

    def forward(self, h_prev_BTD, emb_BTD, cos, sin, start_pos=0, cache: LayerCache | None = None) -> torch.Tensor:
        """h^k (B, T, D), before the head's norm, for positions start_pos .. start_pos + T - 1."""
        return self.block(self.combine(h_prev_BTD, emb_BTD), cos, sin, start_pos, cache)


class Transformer(nn.Module):
    """`moe_layer` builds the MoE feed-forwards: the plain-torch `MoE` (reference, inference) or
    `model.moe_deepspeed.DeepSpeedMoE` (training with DeepSpeed); both keep the same interface."""

    def __init__(self, config: ModelConfig, moe_layer: Callable[[ModelConfig], nn.Module] = MoE):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i, moe_layer) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config, moe_layer) for _ in range(config.mtp_depth))
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style: weights ~ N(0, 0.02), and the projections that write into the residual stream
        (attention wo, SwiGLU w2, expert w2) scaled by 1/sqrt(2 n_layers) so the stream's variance stays
        ~1 with depth; the untrained model then predicts near-uniformly (loss ~ ln V)."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)  # the MTP blocks as the main ones
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms stay at 1
            is_output = name.endswith(("wo.weight", "w2.weight", "w2_EDF"))
            nn.init.normal_(p, mean=0.0, std=out_std if is_output else std)

    def new_mtp_cache(self, batch: int, max_len: int | None = None) -> list[LayerCache]:
        """One full-precision cache per MTP module."""
        n_kv = self.config.n_kv_heads or self.config.n_heads
        shape = (batch, n_kv, max_len or self.config.max_seq_len, self.config.head_dim)
        dtype = self.embed.weight.dtype
        return [LayerCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.mtp]

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list[LayerCache]:
        """One cache per layer, in the embedding's dtype unless given; a model may set `cache_factory`
        (e.g. inference.runtime.kv_cache's INT8 cache)."""
        dtype = dtype or self.embed.weight.dtype
        n_kv = self.config.n_kv_heads or self.config.n_heads
        shape = (batch, n_kv, max_len or self.config.max_seq_len, self.config.head_dim)
        factory = getattr(self, "cache_factory", None)
        if factory is not None:
            return [factory(shape, i) for i in range(len(self.layers))]
        return [LayerCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.layers]

    def forward(
        self,
        tokens_BT: torch.Tensor,
        start_pos: int = 0,
        cache: list[LayerCache] | None = None,
        key_mask_BS: torch.Tensor | None = None,
        with_mtp: bool = False,
        return_hidden: bool = False,
        mtp_detached: bool = False,
    ):
        """Logits (B, T, V) for tokens at positions start_pos .. start_pos + T - 1. For a batch of prompts
        of different lengths, left-pad them and pass key_mask_BS (False on padding, S >= start_pos + T):
        RoPE scores depend only on relative positions, so each row gets its unpadded result.

        with_mtp (training, from position 0, no cache): (logits, [MTP logits of depth k, (B, T - k, V)]), where
        depth k's row i predicts token i + k + 1. return_hidden: (logits, h) with h (B, T, D) the final hidden state
        through the final norm, which MTP module 1 starts from. mtp_detached: the MTP modules read the main model's
        hidden states, embeddings and head without passing gradients back to them, so only the modules learn from
        their loss and the main model trains exactly as it would without them."""
        T = tokens_BT.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T]
        emb = self.embed(tokens_BT)
        x = emb
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, start_pos, None if cache is None else cache[i], key_mask_BS)
        h = self.norm(x)
        logits = self.lm_head(h)
        if return_hidden:
            return logits, h
        if not with_mtp:
            return logits
        assert start_pos == 0 and cache is None and key_mask_BS is None, "MTP training runs whole sequences"
        mtp_logits = []
        head = self.lm_head.weight
        if mtp_detached:
            h, emb, head = h.detach(), emb.detach(), head.detach()
        for k, module in enumerate(self.mtp, start=1):
            if k >= T:
                break
            h = module(h[:, : T - k], emb[:, k:], cos[: T - k], sin[: T - k])
            mtp_logits.append(F.linear(module.norm(h), head))
        return logits, mtp_logits

    def mtp_step(self, k: int, h_prev_BTD, tokens_BT, start_pos: int, cache: list[LayerCache] | None = None):
        """MTP module k (1-based) at positions start_pos ..: its hidden state h^k and its logits, which predict the
        token k + 1 positions ahead. tokens_BT are the tokens k positions ahead of those positions."""
        T = tokens_BT.shape[1]
        cos, sin = self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T]
        module = self.mtp[k - 1]
        h = module(h_prev_BTD, self.embed(tokens_BT), cos, sin, start_pos, None if cache is None else cache[k - 1])
        return h, self.lm_head(module.norm(h))

    def moe_layers(self) -> list[nn.Module]:
        """The main model's MoE feed-forwards, each with last_routing, aux_loss, bias and update_bias(load_E)."""
        return [layer.ffn for layer in self.layers if not isinstance(layer.ffn, SwiGLU)]

    def mtp_moe_layers(self) -> list[nn.Module]:
        """The MTP modules' MoE feed-forwards (they balance like the main ones)."""
        return [m.block.ffn for m in self.mtp if not isinstance(m.block.ffn, SwiGLU)]

    def aux_loss(self) -> torch.Tensor:
        return sum((m.aux_loss for m in self.moe_layers() + self.mtp_moe_layers()), torch.zeros(()))
