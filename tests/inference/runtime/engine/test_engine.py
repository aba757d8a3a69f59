"""The serving engine against the eager references: identical greedy output for batches of requests that
arrive while others decode (plain and speculative, every KV cache format, several block sizes), the
target's distribution under batched speculative sampling, prefix-cache reuse, admission by KV memory,
aborts and time limits."""

import dataclasses
import random
import time

import pytest
import torch

from inference.runtime.engine.engine import Engine, EngineConfig
from inference.runtime.engine.sampler import SamplingParams
from inference.runtime.generate import Generator, SamplingConfig, probabilities
from inference.runtime.kv_cache import calibrate_channel_scales, use_int8_kv_cache
from tests.inference.runtime.test_speculative import models


class Collect:
    """Each request's tokens and finish reason, as the engine delivers them."""

    def __init__(self):
        self.tokens, self.finish, self.cached = {}, {}, {}

    def __call__(self, out) -> None:
        self.tokens.setdefault(out.request_id, []).extend(out.token_ids)
        self.cached[out.request_id] = out.cached_tokens
        if out.finish_reason is not None:
            self.finish[out.request_id] = out.finish_reason


def staggered(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]], seed: int = 0) -> Collect:
    """Add the requests a few at a time between steps, so that prompts join while others decode."""
    rng, out, pending = random.Random(seed), Collect(), list(requests)
    while pending or engine.has_work():
        for _ in range(rng.randint(0, 3)):
            if pending:
                rid, prompt, params = pending.pop(0)
                engine.add(rid, prompt, params, out)
        engine.step()
    return out


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize(
    "kv_cache,speculative,block_size,gamma",
    [("fp32", False, 4, 3), ("fp32", True, 4, 3), ("fp32", True, 1, 1), ("fp32", True, 16, 5),
     ("int8", True, 4, 3), ("int8-channel", True, 8, 2)],
)  # fmt: skip
def test_batched_greedy_equals_each_request_decoded_alone(kv_cache, speculative, block_size, gamma):
    target, draft = models()
    if kv_cache == "int8":
        use_int8_kv_cache(target)
    elif kv_cache == "int8-channel":
        use_int8_kv_cache(target, calibrate_channel_scales(target, [torch.randint(0, 512, (2, 40))]))
    ref = Generator(target)
    config = EngineConfig(max_batch=6, block_size=block_size, gamma=gamma, max_step_tokens=24)
    engine = Engine(ref, Generator(draft) if speculative else None, config)
    assert_batched_greedy(engine, ref, prompts(14), speculative)


def assert_batched_greedy(engine: Engine, ref: Generator, ps: list[list[int]], speculative: bool) -> None:
    """Requests of several lengths, added while others decode: each gets `ref`'s own greedy tokens, the engine
    batched them up to max_batch, a proposer (if any) was right sometimes, and every KV block is free after."""
    lengths = [5 + (i * 7) % 30 for i in range(len(ps))]
    requests = [
        (str(i), p, SamplingParams(max_new_tokens=n, temperature=0)) for i, (p, n) in enumerate(zip(ps, lengths))
    ]
    out = staggered(engine, requests)
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert out.tokens[str(i)] == ref.generate_ids(p, SamplingConfig(max_new_tokens=n)), i
        assert out.finish[str(i)] == "length"
    assert max(engine.stats.batch_sizes) == engine.config.max_batch  # it did batch, up to max_batch
    if speculative:
        assert engine.stats.proposed > 0 and 0 < engine.stats.accepted <= engine.stats.proposed
    assert engine.pool.used() == 0 and engine.pool.reserved == 0


def test_batched_speculative_sampling_follows_the_targets_distribution():
    """Chi-square: the second token of many sampled requests, decoded 64 at a time with a draft (one round of
    gamma 1 each), against the exact marginal of the target's own sampling; two groups of requests with
    different temperatures and top_p share every batch."""
    N = 1500
    target, draft = models(vocab=8, sharpen=3.0)
    engine = Engine(Generator(target), Generator(draft), EngineConfig(max_batch=64, max_queue=4 * N, gamma=3))
    prompt = [1, 5, 2]
    groups = {"hot": SamplingConfig(temperature=1.0), "cool": SamplingConfig(temperature=0.7, top_p=0.9)}
    requests = []
    for i in range(N):
        for name, cfg in groups.items():
            params = SamplingParams(max_new_tokens=3, temperature=cfg.temperature, top_p=cfg.top_p, seed=10_000 + i)
            requests.append((f"{name}-{i}", prompt, params))
    out = Collect()
    for rid, p, params in requests:
        engine.add(rid, p, params, out)
    engine.run_until_done()
    assert engine.stats.spec_rounds >= 2 * N and 0 < engine.stats.accepted < engine.stats.proposed
    with torch.no_grad():
        p1 = {name: probabilities(target(torch.tensor([prompt]))[0, -1:], cfg)[0] for name, cfg in groups.items()}
        for name, cfg in groups.items():
            marginal = torch.zeros(8)
            for t1 in range(8):
                p2 = probabilities(target(torch.tensor([[*prompt, t1]]))[0, -1:], cfg)[0]
                marginal += p1[name][t1] * p2
            second = torch.tensor([out.tokens[f"{name}-{i}"][1] for i in range(N)])
            freq = torch.bincount(second, minlength=8).float()
            seen = marginal > 0
            chi2 = ((freq[seen] - N * marginal[seen]) ** 2 / (N * marginal[seen])).sum().item()
            assert chi2 < 24.3, (name, freq / N, marginal)  # 7 degrees of freedom at most: 99.9% quantile
            assert freq[~seen].sum() == 0  # top_p's excluded tokens never appear


def test_a_seeded_request_repeats_whatever_shares_its_batch():
    target, draft = models()
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=42)
    prompt = [5, 17, 3]

    def run(company: int) -> list[int]:
        engine = Engine(Generator(target), Generator(draft), EngineConfig(gamma=3))
        out = Collect()
        for i, p in enumerate(prompts(company, seed=3)):
            engine.add(f"other-{i}", p, SamplingParams(max_new_tokens=30, temperature=1.0), out)
        engine.add("seeded", prompt, params, out)
        engine.run_until_done()
        return out.tokens["seeded"]

    alone = run(0)
    assert run(7) == alone and run(15) == alone


def test_penalties_and_logit_bias_match_a_reference_loop():
    """Greedy decoding with penalties and a bias, computed by full recomputation of the eager model (a mildly
    sharpened model, whose logit gaps the penalties can close)."""
    target, draft = models(sharpen=2.0)
    prompt = [5, 17, 3, 99]
    params = SamplingParams(max_new_tokens=15, temperature=0, frequency_penalty=0.7, presence_penalty=0.4,
                            logit_bias={7: 3.0, 11: -50.0})  # fmt: skip
    expected, seq = [], list(prompt)
    with torch.no_grad():
        for _ in range(15):
            logits = target(torch.tensor([seq]))[0, -1].clone()
            logits[7] += 3.0
            logits[11] -= 50.0
            counts = torch.bincount(torch.tensor(expected, dtype=torch.long), minlength=512).float()
            logits -= 0.7 * counts + 0.4 * (counts > 0)
            expected.append(int(logits.argmax()))
            seq.append(expected[-1])
    for draft_gen in (None, Generator(draft)):
        engine = Engine(Generator(target), draft_gen, EngineConfig(gamma=3))
        out = Collect()
        engine.add("r", prompt, params, out)
        engine.run_until_done()
        assert out.tokens["r"] == expected
    assert len(set(expected)) > 3


def test_a_shared_prefix_is_computed_once():
    target, draft = models()
    torch.manual_seed(2)
    system = torch.randint(3, 512, (40,)).tolist()
    first, second = [*system, 10, 11], [*system, 20, 21, 22]
    ref = Generator(target)
    engine = Engine(ref, Generator(draft), EngineConfig(block_size=8, gamma=3))
    out = Collect()
    engine.add("first", first, SamplingParams(max_new_tokens=6, temperature=0), out)
    engine.run_until_done()
    computed = engine.stats.prompt_tokens
    engine.add("second", second, SamplingParams(max_new_tokens=6, temperature=0), out)
    engine.run_until_done()
    assert out.cached["first"] == 0 and out.cached["second"] == 40  # five full blocks of the shared 40
    assert engine.stats.prompt_tokens - computed == len(second) - 40
    assert out.tokens["second"] == ref.generate_ids(second, SamplingConfig(max_new_tokens=6))
    # a prompt that differs in its first block shares nothing, though its later tokens are the same
    engine.add("third", [1, *system[1:], 20], SamplingParams(max_new_tokens=2, temperature=0), out)
    engine.run_until_done()
    assert out.cached["third"] == 0
    assert engine.scheduler.prefix_hits == 40


def test_requests_wait_for_kv_memory_and_running_ones_always_finish():
    """A cache of 12 blocks of 4: each request may need 6, so two run at once and the rest wait their turn;
    memory held follows the tokens, and every request finishes with the right text."""
    target, _ = models()
    ref = Generator(target)
    engine = Engine(ref, None, EngineConfig(block_size=4, kv_blocks=12, prefix_caching=False))
    ps = prompts(5, seed=4)
    ps = [(p * 4)[:8] for p in ps]
    out = Collect()
    for i, p in enumerate(ps):
        engine.add(str(i), p, SamplingParams(max_new_tokens=16, temperature=0), out)
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 3
    assert engine.pool.used() == 4  # the two prompts' blocks (8 positions each), not their whole reservation
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, len(engine.scheduler.running))
        assert engine.pool.used() <= 12
    assert most == 2
    for i, p in enumerate(ps):
        assert out.tokens[str(i)] == ref.generate_ids(p, SamplingConfig(max_new_tokens=16))
    with pytest.raises(ValueError, match="more KV blocks than the cache holds"):
        engine.add("huge", list(range(3, 40)), SamplingParams(max_new_tokens=20), out)


def test_abort_and_time_limit_free_the_blocks_at_the_next_step():
    target, draft = models()
    engine = Engine(Generator(target), Generator(draft), EngineConfig(block_size=4, gamma=3))
    out = Collect()
    engine.add("gone", [5, 6, 7], SamplingParams(max_new_tokens=50), out)
    engine.add("slow", [5, 6, 8], SamplingParams(max_new_tokens=50), out, timeout=0.05)
    engine.add("kept", [5, 6, 9], SamplingParams(max_new_tokens=10), out)
    engine.step()
    engine.step()
    assert engine.pool.used() > 0
    engine.abort("gone")
    time.sleep(0.06)
    engine.step()
    assert out.finish["gone"] == "abort" and out.finish["slow"] == "timeout"
    assert [s.request_id for s in engine.scheduler.running] == ["kept"]
    engine.run_until_done()
    assert out.finish["kept"] == "length" and engine.pool.used() == 0 and engine.pool.reserved == 0


def test_the_configuration_is_checked():
    target, _ = models()
    fields = ("max_batch", "max_queue", "max_step_tokens", "block_size", "gamma", "kv_blocks", "compile_max_tokens")
    for field in fields:
        with pytest.raises(ValueError, match=f"{field} must be >= 1"):
            Engine(Generator(target), None, dataclasses.replace(EngineConfig(), **{field: 0}))


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(monkeypatch):
    from inference.runtime.engine import runner

    target, _ = models()
    engine = Engine(Generator(target), None, EngineConfig(block_size=4))
    out, errors = Collect(), []
    real = runner.forward
    calls = iter([RuntimeError("out of memory"), None])

    def flaky(*args):
        failure = next(calls, None)
        if failure is not None:
            raise failure
        return real(*args)

    monkeypatch.setattr(runner, "forward", flaky)
    engine.add("unlucky", [5, 6, 7], SamplingParams(max_new_tokens=4), lambda o: errors.append(o.error) or out(o))
    engine.step()
    assert out.finish["unlucky"] == "error" and "RuntimeError: out of memory" in errors[-1]
    assert engine.pool.used() == 0 and engine.pool.reserved == 0
    engine.add("next", [5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0), out)
    engine.run_until_done()
    assert out.tokens["next"] == Generator(target).generate_ids([5, 6, 7], SamplingConfig(max_new_tokens=4))


def test_prompts_skip_the_draft_and_it_catches_up_on_shared_blocks():
    """The draft does not see a prompt as it is prefilled: a request that never drafts (one token) leaves
    blocks the target holds but the draft does not; a later request reusing them has the draft catch up
    on them at its first proposal (and gets the target's own greedy text), after which they are the
    draft's too and a third request starts its draft past them."""
    target, draft = models()
    torch.manual_seed(3)
    system = torch.randint(3, 512, (32,)).tolist()
    ref = Generator(target)
    engine = Engine(ref, Generator(draft), EngineConfig(block_size=8, gamma=3, adaptive_gamma=False))
    out = Collect()
    engine.add("one-token", [*system, 9], SamplingParams(max_new_tokens=1, temperature=0), out)
    engine.run_until_done()
    assert engine.stats.proposed == 0 and len(engine.pool.cached) == 4 and not engine.pool.draft_ready
    second = [*system, 10, 11]
    engine.add("second", second, SamplingParams(max_new_tokens=8, temperature=0), out)
    engine.run_until_done()
    assert out.cached["second"] == 32 and engine.stats.proposed > 0
    assert out.tokens["second"] == ref.generate_ids(second, SamplingConfig(max_new_tokens=8))
    assert len(engine.pool.draft_ready) >= 4  # the shared blocks, now in the draft's cache too
    engine.add("third", [*system, 12], SamplingParams(max_new_tokens=2, temperature=0), out)
    with engine._lock:
        engine.scheduler.admit()
    [third] = engine.scheduler.running
    assert third.draft_computed == 32 and third.computed == 32
    engine.run_until_done()
    assert out.tokens["third"] == ref.generate_ids([*system, 12], SamplingConfig(max_new_tokens=2))


def test_gamma_is_capped_so_that_a_round_of_the_full_batch_fits_the_compiled_steps():
    """A round of max_batch requests takes max_batch x (gamma + 1) tokens: gamma shrinks until it fits the largest
    compiled step (compile_max_tokens, at most max_step_tokens)."""
    target, draft = models()

    def gamma(**config) -> int:
        return Engine(Generator(target), Generator(draft), EngineConfig(gamma=4, **config)).gamma

    assert gamma(max_batch=4, max_step_tokens=64) == 4  # 4 x 5 = 20 <= 64
    assert gamma(max_batch=16, max_step_tokens=64) == 3  # 16 x 4 = 64
    assert gamma(max_batch=16, max_step_tokens=256, compile_sizes=(16,), compile_max_tokens=48) == 2
    assert gamma(max_batch=64, max_step_tokens=64) == 1  # at least one proposal: the round runs eager
