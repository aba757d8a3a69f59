"""A MoE layer's routed experts computed grouped, for the engine's steps: a fixed set of products instead of a
Python loop over whichever experts the step's tokens chose. Two modes, both of static shape (so that a compiled
graph, inference.runtime.engine.compiled, never changes), chosen per step size by `use_sparse`:

- sparse: only the chosen experts' weights are read. Each of the N K (token, slot) assignments gathers its
  expert's matrices from an (E, out, in) stack and takes one matrix-vector product (`gathered_matvec`), so a step
  of one token reads K of the E experts, and a step of N tokens the union of theirs (an expert chosen twice is
  read from memory once and from cache after). Float and INT8 stacks: a multiply-and-reduce over the gathered
  stack, which inductor fuses into one loop that loads the chosen rows where they lie (and dequantizes INT8 as it
  loads), with no gathered copy. INT4 experts are read as bytes, one value each (nibble unpacking in the graph
  ran several times slower than the bytes it saves), still E / top_k fewer than the dense mode. llama.cpp's
  `mul_mat_id` does the same for a decoding step.
- dense: every expert for every token, as below: E / top_k times the work, in a few large products. The compiled
  step uses it only for INT4 experts past 4 assignments per expert (`use_sparse`), where the packed kernel's
  half-size reads win.

The dense mode. With E experts of width F over model width D, a token's output is
sum_e w_e W2_e (silu(W1_e x) * W3_e x), w_e its gating weight (0 for experts it did not choose). Stacking the
experts' rows,
W13 = [W1_1; ..; W1_E; W3_1; ..; W3_E] (2 E F, D), gives every expert's hidden units in one product, and
W2cat = [W2_1 .. W2_E] (D, E F) sums the experts' outputs in one more: out = W2cat (w * h). Every token
pays for all E experts (E / top_k times the FLOPs of its own), which at a decoding step's few tokens is
cheaper than dispatching up to 3 E small products and the gathers around them; long prompt chunks of the eager
path keep the per-expert loop (model.transformer.MoE), where FLOPs dominate.

INT8 experts stack the same way: each row keeps its own scale, so W13's products are exactly the
per-expert ones. W2's rows would mix experts, and an INT8 row has one scale per output, so INT8 W2 stays one
product per expert (E of them, over all tokens, still without gathers), and its gating weight multiplies
the product's output, as in the per-expert loop. INT4 experts keep the loop in the dense mode: torch's packed
CPU layout depends on the whole matrix, so packed experts cannot be stacked as they are. So do AWQ-scaled experts
whose input scales differ. The sparse mode takes every format.

Shape legend: N tokens, D model width, E experts, F expert width, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.runtime.quantize import Int4Linear, Int8Linear, stack_rows
from kernels import w4a8
from model.transformer import MoE

SPARSE_INT4_MAX_ASSIGNMENTS_PER_EXPERT = 4
"""INT4 experts run sparse up to this many (token, expert) assignments per expert (see use_sparse)."""


def use_sparse(tokens: int, moe: MoE) -> bool:
    """Whether a compiled step of `tokens` tokens computes this layer's experts sparse. Float and INT8: always,
    since a gathered product per assignment does top_k / E of the dense mode's work. INT4, whose sparse mode reads
    bytes where the dense one reads nibbles: up to SPARSE_INT4_MAX_ASSIGNMENTS_PER_EXPERT x E assignments. Measured
    on the demo MoE, 2 cores (bench/experts_modes.py): sparse 1.7-2.1x faster than dense from 1 to 64 tokens in fp32
    and INT8; in INT4 2.2x at 1 token, 1.3x at 16, 0.9x at 64."""
    if moe.quantized is not None and isinstance(moe.quantized[0][0], Int4Linear):
        return tokens * moe.config.top_k <= SPARSE_INT4_MAX_ASSIGNMENTS_PER_EXPERT * moe.config.n_routed_experts
    return True


class ExpertStack(torch.nn.Module):
    """One role (w1, w3 or w2) of every routed expert, stacked (E, out, in), in the experts' own format:
    - fp32/bf16: `w` (E, O, I);
    - INT8 (inference.runtime.quantize.Int8Linear): `q` int8 (E, O, I) and `scale` (E, O);
    - INT4 (Int4Linear): `q` int8 (E, O, I), the values q - 8 (-8..7) held one per byte, unpacked from the
      layers' nibbles, and `scale`, `zero` (E, O, I / group) from the layers' bf16 scale and min:
      w = (q - 8) scale + zero;
    and `input_scale` (E, I) when the experts were AWQ-scaled (x is multiplied by it first)."""

    def __init__(self, layers: list | torch.Tensor):
        """`layers`: the experts' quantized layers, in order, or their float weights already stacked (E, O, I),
        which are then used as they are, without a copy."""
        super().__init__()
        first = layers[0]
        self.kind = "int8" if isinstance(first, Int8Linear) else "int4" if isinstance(first, Int4Linear) else "float"
        for name in ("w", "q", "scale", "zero", "input_scale"):
            self.register_buffer(name, None, persistent=False)
        if self.kind == "float":
            self.w = layers.detach()
            return
        if self.kind == "int8":
            self.q = torch.stack([m.q[:, : m.in_features] for m in layers]).contiguous()
            self.scale = torch.stack([m.scale.float() for m in layers])
        else:  # the INT4 values as bytes, q - 8 in -8..7, beside the layers' own bf16 group scales and zeros
            self.group_size = first.group_size
            n = first.out_features
            self.q = torch.stack([w4a8.unpack(m.packed, n).to(torch.int8) - 8 for m in layers]).contiguous()
            scale = [w4a8.untile_rows(m.scale, n).float() for m in layers]
            self.scale = torch.stack(scale).contiguous()
            self.zero = torch.stack([w4a8.untile_rows(m.min, n).float() + 8 * s for m, s in zip(layers, scale)])
        scales = [m.input_scale for m in layers]
        if any(s is not None for s in scales):
            ones = torch.ones(first.in_features)
            self.input_scale = torch.stack([ones if s is None else s.float() for s in scales])

    def gathered_matvec(self, e_A: torch.Tensor, x_AI: torch.Tensor) -> torch.Tensor:
        """(A, O): assignment a's input times the matrix of expert e_A[a]."""
        x = x_AI.float()
        if self.input_scale is not None:
            x = x * self.input_scale[e_A]
        if self.kind == "float":
            return (x[:, None, :] * self.w[e_A].float()).sum(-1).to(x_AI.dtype)
        if self.kind == "int8":
            return ((x[:, None, :] * self.q[e_A].float()).sum(-1) * self.scale[e_A]).to(x_AI.dtype)
        # INT4, per group g of inputs: sum_k x_k w_k = scale_g sum_k x_k (q_k - 8) + zero_g sum_k x_k
        A, (_, n_out, n_in), g = x.shape[0], self.q.shape, self.group_size
        x_A1Gg = x.view(A, 1, n_in // g, g)
        dot_AOG = (x_A1Gg * self.q[e_A].view(A, n_out, n_in // g, g).float()).sum(-1)
        return (dot_AOG * self.scale[e_A] + self.zero[e_A] * x_A1Gg.sum(-1)).sum(-1).to(x_AI.dtype)


class GroupedExperts(torch.nn.Module):
    """The routed experts of one MoE layer, stacked once (at engine start: the weights must not change).
    A module whose stacks are buffers, so that a frozen compiled graph (inference.runtime.engine.compiled) folds
    them in as constants, as it does the model's own weights."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe
        E, F_, D = moe.config.n_routed_experts, moe.config.d_expert, moe.config.d_model
        self.E, self.F = E, F_
        self.w13_layer = self.w2_experts = None
        if moe.quantized is None:
            self.stacks = torch.nn.ModuleList(ExpertStack(w) for w in (moe.w1_EFD, moe.w3_EFD, moe.w2_EDF))
        else:
            self.stacks = torch.nn.ModuleList(ExpertStack(list(layers)) for layers in zip(*moe.quantized))
        """w1, w3, w2 of every expert, for the sparse mode."""
        if moe.quantized is None:
            with torch.no_grad():
                w13 = torch.cat([moe.w1_EFD.reshape(E * F_, D), moe.w3_EFD.reshape(E * F_, D)]).contiguous()
                self.register_buffer("w13", w13, persistent=False)
                w2 = moe.w2_EDF.permute(1, 0, 2).reshape(D, E * F_).contiguous()
                self.register_buffer("w2", w2, persistent=False)
        else:
            self.w13 = self.w2 = None
            w1s, w3s, w2s = zip(*moe.quantized)
            self.w13_layer = stack_rows([*w1s, *w3s])  # None: the per-expert loop
            self.w2_experts = torch.nn.ModuleList(w2s)

    @property
    def usable(self) -> bool:
        return self.w13 is not None or self.w13_layer is not None

    def _gates(self, x_ND: torch.Tensor) -> torch.Tensor:
        """(N, E) gating weights: each token's combine weight for the experts it chose, 0 for the others."""
        routing = self.moe.router(x_ND)
        weight_NE = torch.zeros(x_ND.shape[0], self.E, dtype=x_ND.dtype, device=x_ND.device)
        return weight_NE.scatter_add_(1, routing.expert_NK, (routing.weight_NK * routing.used_NK).to(x_ND.dtype))

    def sparse(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The layer's output reading only the chosen experts' weights (module docstring), in any format."""
        N, D = x_ND.shape
        routing = self.moe.router(x_ND)
        K = routing.expert_NK.shape[1]
        e_A = routing.expert_NK.reshape(N * K)
        x_AD = x_ND[:, None, :].expand(N, K, D).reshape(N * K, D)
        w1, w3, w2 = self.stacks
        h_AF = F.silu(w1.gathered_matvec(e_A, x_AD)) * w3.gathered_matvec(e_A, x_AD)
        y_AD = w2.gathered_matvec(e_A, h_AF)
        gate_NK = (routing.weight_NK * routing.used_NK).to(y_AD.dtype)
        out_ND = (y_AD.view(N, K, D) * gate_NK[..., None]).sum(1)
        return out_ND + self.moe.shared(x_ND) if self.moe.shared is not None else out_ND

    def for_step(self, x_ND: torch.Tensor, long: bool = False) -> torch.Tensor:
        """The compiled step's choice for a step of this many tokens (`use_sparse`): sparse or dense. long: the
        graph of dynamic size, past the buckets, whose token count is symbolic: it asks `use_sparse` about its
        largest steps (a guard on the count would split the graph)."""
        tokens = x_ND.shape[0] if not long else 1 << 30
        return self.sparse(x_ND) if use_sparse(tokens, self.moe) else self.dense(x_ND)

    def dense(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The layer's output with every expert computed for every token, whatever the experts' format: the
        stacked products when they exist, else one call per expert over all tokens. No operator depends on
        which experts were chosen, so a compiled graph (inference.runtime.engine.compiled) never changes."""
        if self.usable:
            return self(x_ND)
        weight_NE = self._gates(x_ND)
        out_ND = sum(self.moe._expert(e, x_ND) * weight_NE[:, e, None] for e in range(self.E))
        return out_ND + self.moe.shared(x_ND) if self.moe.shared is not None else out_ND

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The layer's output for x (the router and the shared experts included)."""
        N = x_ND.shape[0]
        moe, weight_NE = self.moe, self._gates(x_ND)
        h13 = F.linear(x_ND, self.w13) if self.w13 is not None else self.w13_layer(x_ND)
        h1, h3 = h13.view(N, 2, self.E, self.F).unbind(1)
        h_NEF = F.silu(h1) * h3
        if self.w2 is not None:
            out_ND = F.linear((h_NEF * weight_NE[..., None]).reshape(N, self.E * self.F), self.w2)
        else:
            out_ND = sum(w2(h_NEF[:, e]) * weight_NE[:, e, None] for e, w2 in enumerate(self.w2_experts))
        if moe.shared is not None:
            out_ND = out_ND + moe.shared(x_ND)
        return out_ND
