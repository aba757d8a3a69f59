import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, debug_tiny, dense_baseline, moe_1b, small_cpu
from model.transformer import MoE, Router, Transformer


def test_parameter_accounting_matches_the_modules():
    for preset in (debug_tiny(), dense_baseline(debug_tiny())):
        for mtp in ({}, {"mtp_depth": 2}, {"mtp_depth": 1, "mtp_moe": False}):
            config = dataclasses.replace(preset, **mtp)
            model = Transformer(config)
            mtp_params = sum(p.numel() for p in model.mtp.parameters())
            assert mtp_params == config.mtp_params()
            assert sum(p.numel() for p in model.parameters()) - mtp_params == config.total_params()


@pytest.mark.parametrize("mtp_moe", [True, False])
def test_mtp_modules_chain_depths_and_decode_incrementally_like_the_training_forward(mtp_moe):
    """Depth k's row i predicts token i + k + 1 from depth k-1's hidden state and token i + k; stepping the modules
    position by position through their caches gives the logits of the one-shot training forward."""
    torch.manual_seed(0)
    config = dataclasses.replace(debug_tiny(), mtp_depth=2, mtp_moe=mtp_moe)
    model = Transformer(config).eval()
    assert isinstance(model.mtp[0].block.ffn, MoE) == mtp_moe and len(model.mtp_moe_layers()) == 2 * mtp_moe
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    T = tokens.shape[1]
    with torch.no_grad():
        logits, mtp_logits = model(tokens, with_mtp=True)
        assert [x.shape[1] for x in mtp_logits] == [T - 1, T - 2]
        main, h0 = model(tokens, return_hidden=True)
        torch.testing.assert_close(main, logits)
        caches = model.new_mtp_cache(batch=2)
        h1_steps, l1_steps, l2_steps = [], [], []
        for i in range(T - 1):  # depth 1 at position i: h0_i and token i + 1
            h1, l1 = model.mtp_step(1, h0[:, i : i + 1], tokens[:, i + 1 : i + 2], i, caches)
            h1_steps.append(h1)
            l1_steps.append(l1)
        h1 = torch.cat(h1_steps, 1)
        for i in range(T - 2):  # depth 2 at position i: h1_i and token i + 2
            l2_steps.append(model.mtp_step(2, h1[:, i : i + 1], tokens[:, i + 2 : i + 3], i, caches)[1])
    torch.testing.assert_close(torch.cat(l1_steps, 1), mtp_logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(l2_steps, 1), mtp_logits[1], rtol=1e-4, atol=1e-5)


def test_dense_baseline_has_the_same_active_parameters():
    for preset in (debug_tiny(), small_cpu(), moe_1b()):
        dense = dense_baseline(preset)
        assert abs(dense.active_params() - preset.active_params()) / preset.active_params() < 1e-3
        assert dense.n_routed_experts == 0
    assert 0.9e9 < moe_1b().total_params() < 1.1e9


def test_kv_cache_decoding_equals_full_recomputation():
    torch.manual_seed(0)
    config = dataclasses.replace(debug_tiny(), n_kv_heads=2)
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch=2)
        steps = [model(tokens[:, :5], 0, cache)]  # prefill, then one token at a time
        steps += [model(tokens[:, t : t + 1], t, cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_loss_decreases_when_fitting_a_batch():
    torch.manual_seed(0)
    config = debug_tiny()
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(config.vocab_size)) < 0.5  # an untrained model predicts near-uniformly
    assert losses[-1] < 0.5 * losses[0]


def router(**changes) -> Router:
    torch.manual_seed(0)
    return Router(dataclasses.replace(debug_tiny(), **{"n_routed_experts": 8, "top_k": 2, **changes}))


def test_bias_moves_load_toward_balance():
    r = router(bias_update_rate=0.01)
    x = torch.randn(4096, r.config.d_model)
    r.weight.data[0] *= 3.0  # expert 0 starts out over-loaded
    ratio = []
    for _ in range(300):
        load = r(x).load_E(8)
        ratio.append((load.max() / load.mean()).item())
        r.update_bias(load)
    assert ratio[0] > 1.5
    assert sum(ratio[-20:]) / 20 < 1.2  # sign updates oscillate around balance: average the last steps


def test_bias_selects_but_does_not_weight():
    r = router()
    x = torch.randn(64, r.config.d_model)
    before = r(x)
    r.bias[3] = 10.0  # expert 3 is now always selected...
    after = r(x)
    assert (after.expert_NK == 3).any(-1).all()
    in_slot = after.expert_NK == 3
    # ...but weighted by its unbiased score, normalised over the chosen experts
    scores = after.scores_NE.gather(-1, after.expert_NK)
    torch.testing.assert_close(after.weight_NK, scores / scores.sum(-1, keepdim=True))
    assert not torch.equal(before.expert_NK, after.expert_NK) and in_slot.any()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_weights_sum_to_one(score_func):
    r = router(score_func=score_func)
    w = r(torch.randn(32, r.config.d_model)).weight_NK
    torch.testing.assert_close(w.sum(-1), torch.ones(32))


def test_top_p_uses_a_variable_number_of_experts():
    r = router(top_p=0.7, top_k=4, score_func="softmax")
    r.weight.data *= 3  # sharper scores: confident tokens need fewer experts
    routing = r(torch.randn(512, r.config.d_model))
    used = routing.used_NK.sum(-1)
    assert used.min() >= 1 and used.max() <= 4 and used.float().std() > 0
    assert used.float().mean() < 0.8 * 4


def test_every_routed_token_is_accounted_for():
    torch.manual_seed(0)
    moe = MoE(debug_tiny())
    moe(torch.randn(2, 16, debug_tiny().d_model))
    routing = moe.last_routing
    assert routing.load_E(4).sum().item() == 2 * 16 * debug_tiny().top_k  # no token dropped: no capacity limit


def test_sequence_balance_loss_is_optional():
    x = torch.randn(2, 8, debug_tiny().d_model)
    plain = MoE(debug_tiny())
    plain(x)
    assert plain.aux_loss.item() == 0.0
    moe = MoE(dataclasses.replace(debug_tiny(), seq_aux_loss_coef=0.01))
    moe(x)
    assert moe.aux_loss.item() > 0 and moe.aux_loss.requires_grad


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(n_routed_experts=4, top_k=5)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(debug_tiny())(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="mtp_depth must be in"):
        dataclasses.replace(debug_tiny(), mtp_depth=-1)
    with pytest.raises(ValueError, match="mtp_depth must be in"):
        dataclasses.replace(debug_tiny(), mtp_depth=63)
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        dataclasses.replace(debug_tiny(), mtp_loss_weight=-0.1)


def test_detached_mtp_modules_learn_without_touching_the_main_model():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(debug_tiny(), mtp_depth=2))
    tokens = torch.randint(0, 512, (2, 16))
    for detached in (False, True):
        model.zero_grad(set_to_none=True)
        _, mtp_logits = model(tokens, with_mtp=True, mtp_detached=detached)
        sum(x.float().pow(2).mean() for x in mtp_logits).backward()
        main = [p.grad for n, p in model.named_parameters() if not n.startswith("mtp.")]
        assert all(p.grad is not None for p in model.mtp.parameters())
        assert all(g is None for g in main) == detached
