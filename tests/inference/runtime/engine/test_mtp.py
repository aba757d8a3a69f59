"""Self-speculative decoding with the target's MTP modules (inference.runtime.engine.mtp) in the batched engine:
greedy output identical to plain decoding, every proposal equal to what the one-shot training forward predicts,
the target's distribution under sampling (chi-square), reproducible seeded requests, prefix reuse, and the
proposer's configuration."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from inference.runtime.engine import mtp
from inference.runtime.engine.engine import Engine, EngineConfig
from inference.runtime.engine.sampler import SamplingParams
from inference.runtime.generate import Generator, SamplingConfig, probabilities
from inference.runtime.kv_cache import use_int8_kv_cache
from model.config import debug_tiny
from model.transformer import Transformer
from tests.inference.runtime.engine.test_engine import Collect, assert_batched_greedy, prompts, staggered
from tests.inference.runtime.test_speculative import models

pytestmark = pytest.mark.slow  # a trained MTP model and compiled steps


def mtp_target(depth: int = 3, seed: int = 0, steps: int = 150) -> tuple[Transformer, list[list[int]]]:
    """A sharpened random MoE target whose MTP modules (MoE blocks) learnt its own greedy text on 48 prompts, so
    that they are right on those texts and often wrong elsewhere; returns it and the 48 texts."""
    torch.manual_seed(seed)
    target = Transformer(dataclasses.replace(debug_tiny(), mtp_depth=depth))
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    target.eval()
    gen = Generator(target)
    texts = []
    for _ in range(48):
        p = torch.randint(3, 512, (4,)).tolist()
        texts.append(p + gen.generate_ids(p, SamplingConfig(max_new_tokens=40)))
    data = torch.tensor([t[:44] for t in texts])
    opt = torch.optim.Adam(target.mtp.parameters(), lr=3e-3)
    for _ in range(steps):  # the MTP loss only: the main model stays as it is
        batch = data[torch.randint(0, len(data), (16,))]
        _, mtp_logits = target(batch[:, :-1], with_mtp=True)
        y = batch[:, 1:]
        loss = sum(F.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten()) for k, lg in enumerate(mtp_logits, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return target.eval(), texts


@pytest.fixture(scope="module")
def trained():
    return mtp_target()


@pytest.mark.parametrize("kv_cache,block_size,gamma", [("fp32", 4, 3), ("fp32", 1, 1), ("fp32", 16, 2), ("int8", 8, 3)])
def test_batched_mtp_greedy_equals_each_request_decoded_alone(trained, kv_cache, block_size, gamma):
    target, texts = trained
    if kv_cache == "int8":  # a copy: the cache format is set on the model
        trained_weights, target = target.state_dict(), Transformer(target.config)
        target.load_state_dict(trained_weights)
        use_int8_kv_cache(target.eval())
    ref = Generator(target)
    engine = Engine(ref, None, EngineConfig(max_batch=6, block_size=block_size, gamma=gamma, max_step_tokens=24))
    assert engine.proposer == "mtp" and engine.gamma == gamma
    # prompts the modules know (from their training texts) and prompts they do not
    assert_batched_greedy(engine, ref, [t[:4] for t in texts[:7]] + prompts(7), speculative=True)


def test_every_proposal_is_what_the_training_forward_predicts(trained, monkeypatch):
    """Round with C confirmed tokens: proposal i comes from depth i + 1 at position C - 2, reading the tokens after
    it (the confirmed one, then proposals). Where those were the final text's, the one-shot forward over the final
    text (Transformer(..., with_mtp=True)) must predict the same token."""
    target, texts = trained
    rounds = []
    real = mtp.propose

    def spy(forward, decoding, gammas, block_size):
        proposals, qs = real(forward, decoding, gammas, block_size)
        rounds.extend((seq.request_id, len(seq.tokens), list(p)) for seq, p in zip(decoding, proposals) if p)
        return proposals, qs

    monkeypatch.setattr(mtp, "propose", spy)
    engine = Engine(Generator(target), None, EngineConfig(max_batch=4, block_size=4, gamma=3, adaptive_gamma=False))
    ps = [t[:4] for t in texts[:3]] + prompts(3, seed=5)
    out = staggered(engine, [(str(i), p, SamplingParams(max_new_tokens=25, temperature=0)) for i, p in enumerate(ps)])
    checked = [0, 0, 0]
    with torch.no_grad():
        for rid, C, proposals in rounds:
            text = ps[int(rid)] + out.tokens[rid]
            _, mtp_logits = target(torch.tensor([text]), with_mtp=True)
            for i, token in enumerate(proposals):
                assert token == int(mtp_logits[i][0, C - 2].argmax()), (rid, C, i)
                checked[i] += 1
                if C + i >= len(text) or text[C + i] != token:
                    break  # later proposals read this one, which the final text does not have
    assert min(checked) > 10, checked  # every depth was compared, many times


def test_batched_mtp_sampling_follows_the_targets_distribution():
    """Chi-square, as for the draft model (test_engine): the second token of many sampled requests, one MTP
    round of gamma 1 each, against the exact marginal of the target's own sampling."""
    N = 1500
    target, _ = models(vocab=8, sharpen=3.0)
    torch.manual_seed(1)
    with_mtp = Transformer(dataclasses.replace(target.config, mtp_depth=2))
    with_mtp.load_state_dict(target.state_dict(), strict=False)
    target = with_mtp.eval()
    engine = Engine(Generator(target), None, EngineConfig(max_batch=64, max_queue=2 * N, gamma=2))
    prompt = [1, 5, 2]
    cfg = SamplingConfig(temperature=0.8, top_p=0.95)
    out = Collect()
    for i in range(N):
        params = SamplingParams(max_new_tokens=3, temperature=cfg.temperature, top_p=cfg.top_p, seed=20_000 + i)
        engine.add(str(i), prompt, params, out)
    engine.run_until_done()
    assert engine.stats.spec_rounds >= N and 0 < engine.stats.accepted < engine.stats.proposed
    with torch.no_grad():
        p1 = probabilities(target(torch.tensor([prompt]))[0, -1:], cfg)[0]
        marginal = torch.zeros(8)
        for t1 in range(8):
            marginal += p1[t1] * probabilities(target(torch.tensor([[*prompt, t1]]))[0, -1:], cfg)[0]
    second = torch.tensor([out.tokens[str(i)][1] for i in range(N)])
    freq = torch.bincount(second, minlength=8).float()
    seen = marginal > 0
    chi2 = ((freq[seen] - N * marginal[seen]) ** 2 / (N * marginal[seen])).sum().item()
    assert chi2 < 24.3, (freq / N, marginal)  # 7 degrees of freedom at most: 99.9% quantile
    assert freq[~seen].sum() == 0


def test_a_seeded_mtp_request_repeats_whatever_shares_its_batch(trained):
    target, _ = trained
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=42)

    def run(company: int) -> list[int]:
        engine = Engine(Generator(target), None, EngineConfig(gamma=3))
        out = Collect()
        for i, p in enumerate(prompts(company, seed=3)):
            engine.add(f"other-{i}", p, SamplingParams(max_new_tokens=30, temperature=1.0), out)
        engine.add("seeded", [5, 17, 3], params, out)
        engine.run_until_done()
        return out.tokens["seeded"]

    alone = run(0)
    assert run(7) == alone and run(15) == alone


def test_a_shared_prefix_is_reused_by_the_target_and_the_mtp_caches(trained):
    """MTP entries at a block's last positions read the next block's tokens, so a hit reuses the blocks that a
    further matched block follows (40 shared tokens in blocks of 8: the first four of five)."""
    target, _ = trained
    torch.manual_seed(2)
    system = torch.randint(3, 512, (40,)).tolist()
    ref = Generator(target)
    engine = Engine(ref, None, EngineConfig(block_size=8, gamma=3))
    out = Collect()
    first, second = [*system, 10, 11], [*system, 20, 21, 22]
    engine.add("first", first, SamplingParams(max_new_tokens=6, temperature=0), out)
    engine.run_until_done()
    assert len(engine.pool.draft_ready) >= 4  # the MTP caches hold the shared blocks too
    engine.add("second", second, SamplingParams(max_new_tokens=6, temperature=0), out)
    engine.run_until_done()
    assert out.cached["second"] == 32
    assert out.tokens["second"] == ref.generate_ids(second, SamplingConfig(max_new_tokens=6))
    engine.add("third", [*system, 12], SamplingParams(max_new_tokens=6, temperature=0), out)
    engine.run_until_done()
    assert out.tokens["third"] == ref.generate_ids([*system, 12], SamplingConfig(max_new_tokens=6))


def test_the_proposer_follows_the_models_and_the_configuration(trained):
    target, _ = trained
    plain, draft = models()
    assert Engine(Generator(plain), Generator(draft)).proposer == "draft"
    assert Engine(Generator(plain)).proposer == "none"
    assert Engine(Generator(target), Generator(draft)).proposer == "mtp"  # auto prefers the model's own modules
    engine = Engine(Generator(target), Generator(draft), EngineConfig(proposer="draft"))
    assert engine.proposer == "draft" and engine.draft is not None
    assert Engine(Generator(target), None, EngineConfig(gamma=8)).gamma == 3  # at most mtp_depth
    with pytest.raises(ValueError, match="no MTP modules"):
        Engine(Generator(plain), None, EngineConfig(proposer="mtp"))
    with pytest.raises(ValueError, match="no draft model"):
        Engine(Generator(target), None, EngineConfig(proposer="draft"))
    with pytest.raises(ValueError, match="proposer must be one of"):
        EngineConfig(proposer="eagle").check()


def test_the_compiled_mtp_step_gives_the_eager_proposals_and_tokens(trained):
    """The MTP modules compiled per depth (inference.runtime.engine.compiled.CompiledMTPStep, one bucket of 4 tokens,
    no autotuning, as tests/inference/runtime/engine/test_compiled.py) against the eager packed forward."""
    target, texts = trained
    config = EngineConfig(max_batch=3, block_size=4, gamma=3, adaptive_gamma=False, max_step_tokens=24,
                          compile_sizes=(4,), compile_autotune=False)  # fmt: skip
    eager, compiled = Engine(Generator(target), None, config), Engine(Generator(target), None, config)
    assert compiled.compile() > 0 and compiled.steps[-1].compiled and not eager.steps[-1].compiled
    ps = [t[:4] for t in texts[:4]] + prompts(3, seed=1)
    requests = [(str(i), p, SamplingParams(max_new_tokens=12, temperature=0)) for i, p in enumerate(ps)]
    want, got = staggered(eager, requests), staggered(compiled, requests)
    assert got.tokens == want.tokens
    assert compiled.stats.accepted_at == eager.stats.accepted_at and compiled.stats.accepted > 0
