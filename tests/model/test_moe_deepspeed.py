"""The DeepSpeed MoE layer with Frugal's gate against the plain-torch reference (no process group needed
for one expert-parallel rank)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import debug_tiny
from model.moe_deepspeed import DeepSpeedMoE, deepspeed_transformer, load_reference_state, reference_state
from model.transformer import Transformer


def pair(**changes) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    config = dataclasses.replace(debug_tiny(), **changes)
    ref = Transformer(config).eval()
    ds = deepspeed_transformer(config).eval()
    load_reference_state(ds, ref.state_dict())
    return ref, ds


@pytest.mark.parametrize(
    "changes", [{}, {"score_func": "sigmoid"}, {"top_p": 0.6, "top_k": 3}, {"n_shared_experts": 0}]
)
def test_deepspeed_layer_gives_the_reference_logits(changes):
    ref, ds = pair(**changes)
    tokens = torch.randint(0, ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ds(tokens), ref(tokens), rtol=1e-5, atol=1e-6)


def test_weights_convert_both_ways_and_each_rank_takes_its_experts():
    ref, ds = pair()
    back = reference_state(ds)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    half = deepspeed_transformer(debug_tiny(), ep_size=2)  # 4 experts, 2 per rank
    load_reference_state(half, ref.state_dict(), ep_rank=1)
    local = half.layers[1].ffn.moe.deepspeed_moe.experts.deepspeed_experts
    assert len(local) == 2
    torch.testing.assert_close(local[0].w1.weight, ref.layers[1].ffn.w1_EFD[2])
    torch.testing.assert_close(local[1].w2.weight, ref.layers[1].ffn.w2_EDF[3])
    with pytest.raises(ValueError, match="do not fit"):
        load_reference_state(ds, {k: v for k, v in ref.state_dict().items() if "attn" not in k})


def test_dropped_routes_are_counted_and_the_rest_computed_exactly():
    torch.manual_seed(0)
    config = dataclasses.replace(debug_tiny(), capacity_factor=0.5)
    layer = DeepSpeedMoE(config).train()
    x = torch.randn(2, 16, config.d_model)
    out = layer(x)
    gate, N, K, E = layer.gate, 32, config.top_k, config.n_routed_experts
    capacity = math.ceil(N / E * 0.5 * K)
    kept = layer.last_routing.used_NK
    assert gate.routed == N * K and gate.dropped_routes == N * K - int(kept.sum()) > 0
    assert gate.last_load_E.max() <= capacity and gate.last_load_E.sum() == int(kept.sum())
    # the output is the shared experts plus exactly the kept routes, with their original weights
    x_ND = x.reshape(-1, config.d_model)
    expected = layer.shared(x_ND)
    experts = layer.moe.deepspeed_moe.experts.deepspeed_experts
    routing = layer.last_routing
    for n, k in kept.nonzero().tolist():
        e = routing.expert_NK[n, k]
        expected[n] += routing.weight_NK[n, k] * experts[e](x_ND[n])
    torch.testing.assert_close(out.reshape(-1, config.d_model), expected, rtol=1e-5, atol=1e-6)
    layer.eval()  # evaluation never drops
    layer(x)
    assert gate.dropped_routes == 0 and gate.last_load_E.sum() == N * K


def test_bias_moves_the_deepspeed_gate_toward_balance():
    torch.manual_seed(0)
    config = dataclasses.replace(debug_tiny(), n_routed_experts=8, bias_update_rate=0.003)
    layer = DeepSpeedMoE(config).train()
    layer.gate.wg.weight.data[0] *= 4.0  # expert 0 starts out over-loaded
    x = torch.randn(1, 1024, config.d_model)
    ratios = []
    with torch.no_grad():
        for _ in range(200):
            layer(x)
            load = layer.last_routing.load_E(8)
            ratios.append((load.max() / load.mean()).item())
            layer.update_bias(load)
    assert ratios[0] > 1.5 and sum(ratios[-20:]) / 20 < 1.2
    assert layer.bias[0] < 0 < layer.bias[1:].mean()


def test_top_p_routes_a_variable_number_of_experts_through_the_gate():
    torch.manual_seed(0)
    config = dataclasses.replace(debug_tiny(), n_routed_experts=8, top_k=4, top_p=0.5, score_func="softmax")
    layer = DeepSpeedMoE(config).eval()
    layer.gate.wg.weight.data *= 3
    layer(torch.randn(1, 512, config.d_model))
    used = layer.last_routing.used_NK.sum(-1).float()
    assert used.min() >= 1 and used.max() <= 4 and used.std() > 0 and used.mean() < 0.8 * 4
    assert layer.gate.routed == int(used.sum())


def test_sequence_balance_loss_reaches_the_router():
    torch.manual_seed(0)
    layer = DeepSpeedMoE(dataclasses.replace(debug_tiny(), seq_aux_loss_coef=0.01)).train()
    layer(torch.randn(2, 8, debug_tiny().d_model))
    layer.aux_loss.backward()
    assert layer.aux_loss.item() > 0 and layer.gate.wg.weight.grad.abs().sum() > 0


def test_training_steps_match_the_reference():
    """A few optimizer steps of both implementations stay together (same loss curve)."""
    ref, ds = pair()
    ref.train(), ds.train()
    tokens = torch.randint(0, ref.config.vocab_size, (4, 33))
    curves = []
    for model in (ref, ds):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(5):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_mtp_modules_on_deepspeed_give_the_reference_logits_and_convert_both_ways():
    ref, ds = pair(mtp_depth=2)
    assert len(ds.mtp_moe_layers()) == 2 and isinstance(ds.mtp[0].block.ffn, DeepSpeedMoE)
    tokens = torch.randint(0, ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        (ref_main, ref_mtp), (ds_main, ds_mtp) = ref(tokens, with_mtp=True), ds(tokens, with_mtp=True)
    torch.testing.assert_close(ds_main, ref_main, rtol=1e-5, atol=1e-6)
    for a, b in zip(ds_mtp, ref_mtp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    back = reference_state(ds)
    assert back.keys() == ref.state_dict().keys() and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
