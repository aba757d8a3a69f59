"""The DeepSeekMoE feed-forward on DeepSpeed's MoE layer (`deepspeed.moe.layer.MoE`), with our own gate.

DeepSpeed does the expert parallelism: with `ep_size` > 1 each rank holds n_routed_experts / ep_size
experts and tokens travel to them by all-to-all. `FrugalGate` replaces DeepSpeed's `TopKGate` (pinned:
deepspeed==0.19.8, whose MOELayer calls the gate with `sparse_routes=True` and expects the 7-tuple
(l_aux, capacity, n_experts, indices_KN, locations_KN, gates_KN, exp_counts)). The gate routes with the
same rule as the plain-torch reference (`model.transformer.route`): softmax or sigmoid scores, a
selection-only bias for auxiliary-loss-free balancing, optional top-p dynamic routing. Shared experts
run beside the DeepSpeed layer on every token.

Weights convert both ways to the reference layout (`model.transformer.MoE`: router.weight, router.bias,
w1_EFD, w3_EFD, w2_EDF, shared.*), which is what a run exports and what inference loads.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoELayer
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from model.config import ModelConfig
from model.transformer import Routing, SwiGLU, Transformer, balance_step, route, sequence_balance_loss

GATE = "moe.deepspeed_moe.gate"
EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts"


class FrugalGate(TopKGate):
    """Routes like `model.transformer.Router`, enforces the training capacity, and counts what it drops.

    Routes an expert cannot take (capacity reached; tokens in order) are dropped: the token keeps its
    other experts and the shared experts. `dropped_routes` and `routed` count them for the metrics.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(
            config.d_model, config.n_routed_experts, k=config.top_k,
            capacity_factor=config.capacity_factor or 1.0, eval_capacity_factor=config.capacity_factor or 1.0,
            min_capacity=1, noisy_gate_policy=None, drop_tokens=config.capacity_factor is not None,
            use_rts=False, top2_2nd_expert_sampling=False,
        )  # fmt: skip
        self.config = config
        self.register_buffer("bias", torch.zeros(config.n_routed_experts), persistent=True)
        self.last_routing: Routing | None = None
        self.last_load_E = torch.zeros(config.n_routed_experts)
        self.dropped_routes = 0
        self.routed = 0

    def forward(self, input, used_token=None, sparse_routes=True, use_tutel=False):
        if not sparse_routes or use_tutel or used_token is not None:
            raise NotImplementedError("FrugalGate serves deepspeed 0.19.8's sparse-route MOELayer only")
        E = self.config.n_routed_experts
        routing = route(torch.nn.functional.linear(input.float(), self.wg.weight.float()), self.bias, self.config)
        N, K = routing.expert_NK.shape
        used_NE = torch.zeros(N, E, dtype=torch.long, device=input.device)
        used_NE.scatter_(1, routing.expert_NK, routing.used_NK.long())
        location_NK = (used_NE.cumsum(0) - 1).gather(1, routing.expert_NK)  # earlier tokens go first
        counts_E = used_NE.sum(0)
        if self.training and self.drop_tokens:
            capacity = max(1, math.ceil(N / E * self.capacity_factor * K))
        else:  # no drops: the largest load, agreed over the expert-parallel group
            capacity_t = counts_E.max().clamp_min(1)
            if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
                dist.all_reduce(capacity_t, op=dist.ReduceOp.MAX, group=self.ep_group)
            capacity = int(capacity_t)
        kept_NK = routing.used_NK & (location_NK < capacity)
        self.last_routing = Routing(routing.expert_NK, routing.weight_NK * kept_NK, kept_NK, routing.scores_NE)
        self.last_load_E = torch.bincount(routing.expert_NK[kept_NK], minlength=E).float().detach()
        self.routed = int(routing.used_NK.sum())
        self.dropped_routes = self.routed - int(kept_NK.sum())
        indices_KN = torch.where(kept_NK, routing.expert_NK, -1).t().contiguous().to(torch.int32)
        locations_KN = (location_NK * kept_NK).t().contiguous().to(torch.int32)
        gates_KN = (routing.weight_NK * kept_NK).t().contiguous()
        l_aux = torch.zeros((), device=input.device)  # the sequence-level loss is computed by DeepSpeedMoE
        return l_aux, torch.tensor(capacity), E, indices_KN, locations_KN, gates_KN, self.last_load_E


class DeepSpeedMoE(nn.Module):
    """Shared experts plus DeepSpeed's MoE layer over fine-grained SwiGLU experts, routed by FrugalGate.
    The same interface as the reference `MoE`: last_routing, aux_loss, bias, update_bias(load_E)."""

    def __init__(self, config: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.config = config
        D, F_ = config.d_model, config.d_expert
        self.moe = DeepSpeedMoELayer(
            hidden_size=D, expert=SwiGLU(D, F_), num_experts=config.n_routed_experts, ep_size=ep_size,
            k=config.top_k, use_residual=False, drop_tokens=config.capacity_factor is not None, use_rts=False,
            top2_2nd_expert_sampling=False,
        )  # fmt: skip
        self.moe.deepspeed_moe.gate = FrugalGate(config)
        self.shared = SwiGLU(D, F_ * config.n_shared_experts) if config.n_shared_experts else None
        self.aux_loss = torch.zeros(())

    @property
    def gate(self) -> FrugalGate:
        return self.moe.deepspeed_moe.gate

    @property
    def last_routing(self) -> Routing | None:
        return self.gate.last_routing

    @property
    def bias(self) -> torch.Tensor:
        return self.gate.bias

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        balance_step(self.gate.bias, load_E, self.config.bias_update_rate)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        out, _, _ = self.moe(x_BTD)
        if self.shared is not None:
            out = out + self.shared(x_BTD)
        cfg = self.config
        self.aux_loss = (
            sequence_balance_loss(self.gate.last_routing, B, T, cfg) if cfg.seq_aux_loss_coef else torch.zeros(())
        )
        return out


def deepspeed_transformer(config: ModelConfig, ep_size: int = 1) -> Transformer:
    """The Frugal transformer with its MoE feed-forwards on DeepSpeed's MoE layer."""
    return Transformer(config, moe_layer=lambda c: DeepSpeedMoE(c, ep_size))


def _moe_prefixes(model: Transformer) -> list[str]:
    """State-dict prefixes of the DeepSpeed MoE layers: the main model's and the MTP modules' blocks."""
    return [f"{name}." for name, module in model.named_modules() if isinstance(module, DeepSpeedMoE)]


def load_reference_state(model: Transformer, reference: dict[str, torch.Tensor], ep_rank: int = 0) -> None:
    """Load reference-layout weights into a DeepSpeed model, taking this rank's slice of the experts
    (global expert ep_rank * n_local + j is local expert j)."""
    state = {k: v for k, v in reference.items()}
    ours = model.state_dict()
    for prefix in _moe_prefixes(model):
        layer: DeepSpeedMoE = model.get_submodule(prefix[:-1])
        n_local = layer.moe.num_local_experts
        state[prefix + GATE + ".wg.weight"] = state.pop(prefix + "router.weight")
        state[prefix + GATE + ".bias"] = state.pop(prefix + "router.bias")
        stacks = {name: state.pop(prefix + key) for name, key in (("w1", "w1_EFD"), ("w3", "w3_EFD"), ("w2", "w2_EDF"))}
        for j in range(n_local):
            for name, stack in stacks.items():
                state[f"{prefix}{EXPERTS}.{j}.{name}.weight"] = stack[ep_rank * n_local + j]
    unknown, missing = sorted(set(state) - set(ours)), sorted(set(ours) - set(state))
    if unknown or missing:
        raise ValueError(f"reference weights do not fit the model: unknown {unknown[:5]}, missing {missing[:5]}")
    model.load_state_dict(state)


def reference_state(model: Transformer, ep_group=None) -> dict[str, torch.Tensor]:
    """The model's weights in the reference layout, experts gathered over the expert-parallel group
    (a collective: every rank of the group must call it)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for prefix in _moe_prefixes(model):
        layer: DeepSpeedMoE = model.get_submodule(prefix[:-1])
        n_local = layer.moe.num_local_experts
        state[prefix + "router.weight"] = state.pop(prefix + GATE + ".wg.weight")
        state[prefix + "router.bias"] = state.pop(prefix + GATE + ".bias")
        for name, key in (("w1", "w1_EFD"), ("w3", "w3_EFD"), ("w2", "w2_EDF")):
            local = torch.stack([state.pop(f"{prefix}{EXPERTS}.{j}.{name}.weight") for j in range(n_local)])
            if ep_group is not None and dist.get_world_size(ep_group) > 1:
                parts = [torch.empty_like(local) for _ in range(dist.get_world_size(ep_group))]
                dist.all_gather(parts, local.contiguous(), group=ep_group)
                local = torch.cat(parts)
            state[prefix + key] = local
    return state
