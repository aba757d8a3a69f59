"""A MoE layer's routed experts computed grouped, for the engine's steps: a fixed set of large matrix
products instead of a Python loop over whichever experts the step's tokens chose.

With E experts of width F over model width D, a token's output is sum_e w_e W2_e (silu(W1_e x) * W3_e x),
w_e its gating weight (0 for experts it did not choose). Stacking the experts' rows,
W13 = [W1_1; ..; W1_E; W3_1; ..; W3_E] (2 E F, D), gives every expert's hidden units in one product, and
W2cat = [W2_1 .. W2_E] (D, E F) sums the experts' outputs in one more: out = W2cat (w * h). Every token
pays for all E experts (E / top_k times the FLOPs of its own), which at a decoding step's few tokens is
cheaper than dispatching up to 3 E small products and the gathers around them; long prompt chunks keep the
per-expert loop (model.transformer.MoE), where FLOPs dominate.

INT8 experts stack the same way: each row keeps its own scale, so W13's products are exactly the
per-expert ones. W2's rows would mix experts, and an INT8 row has one scale per output, so INT8 W2 stays one
product per expert (E of them, over all tokens, still without gathers), and its gating weight multiplies
the product's output, as in the per-expert loop. INT4 experts keep the loop: torch's packed CPU layout
depends on the whole matrix, so packed experts cannot be stacked without their unpacked weights. So do
AWQ-scaled experts whose input scales differ.

Shape legend: N tokens, D model width, E experts, F expert width, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.runtime.quantize import Int8Linear
from model.transformer import MoE


def _stack_rows(layers: list) -> torch.nn.Module | None:
    """One INT8 layer whose output rows are the given layers' rows, in order; None unless they are all INT8
    layers with the same input scales."""
    first = layers[0]
    scales = [m.input_scale for m in layers]
    if any((s is None) != (scales[0] is None) or (s is not None and not torch.equal(s, scales[0])) for s in scales):
        return None
    fused = first.__class__.__new__(first.__class__)
    torch.nn.Module.__init__(fused)
    fused.register_buffer("input_scale", scales[0])
    if isinstance(first, Int8Linear) and all(isinstance(m, Int8Linear) for m in layers):
        fused.in_features = first.in_features
        fused.register_buffer("q", torch.cat([m.q for m in layers]))
        fused.register_buffer("scale", torch.cat([m.scale for m in layers]))
        return fused
    return None


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
            with torch.no_grad():
                w13 = torch.cat([moe.w1_EFD.reshape(E * F_, D), moe.w3_EFD.reshape(E * F_, D)]).contiguous()
                self.register_buffer("w13", w13, persistent=False)
                w2 = moe.w2_EDF.permute(1, 0, 2).reshape(D, E * F_).contiguous()
                self.register_buffer("w2", w2, persistent=False)
        else:
            self.w13 = self.w2 = None
            w1s, w3s, w2s = zip(*moe.quantized)
            self.w13_layer = _stack_rows([*w1s, *w3s])  # None: the per-expert loop
            self.w2_experts = torch.nn.ModuleList(w2s)

    @property
    def usable(self) -> bool:
        return self.w13 is not None or self.w13_layer is not None

    def _gates(self, x_ND: torch.Tensor) -> torch.Tensor:
        """(N, E) gating weights: each token's combine weight for the experts it chose, 0 for the others."""
        routing = self.moe.router(x_ND)
        weight_NE = torch.zeros(x_ND.shape[0], self.E, dtype=x_ND.dtype, device=x_ND.device)
        return weight_NE.scatter_add_(1, routing.expert_NK, (routing.weight_NK * routing.used_NK).to(x_ND.dtype))

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
