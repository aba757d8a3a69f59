"""The compiled step (inference.runtime.engine.compiled) against the eager packed forward
(inference.runtime.engine.runner): the same greedy tokens for requests that join and leave a batch, and close logits
on the same cache, for fp32, INT8 and INT4 weights and the fp32, INT8 and INT8-per-channel caches; speculative
decoding through two compiled models; and, for the INT8 weights (torch's native kernels), the same under every
ATEN_CPU_CAPABILITY this machine runs, each in a subprocess, so that a crash fails the test.

A compile takes tens of seconds on 2 cores, so every engine here compiles buckets of 1 and 4 tokens (it serves
batches of 2 to 4 tokens through padding; at 1 token the MoE layer reads its chosen experts only) and the graph of
dynamic size for steps of 5 to max_step_tokens (24) tokens (longer prompt chunks run eager), without inductor's
autotuning, which changes which GEMM kernel runs, not the graph (bench/peers.py runs the autotuned graphs
and checks their fp32 tokens against eager ones)."""

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from inference.runtime.engine import runner
from inference.runtime.engine.compiled import bucket_for
from inference.runtime.engine.engine import Engine, EngineConfig
from inference.runtime.engine.runner import Batch, Run
from inference.runtime.engine.sampler import SamplingParams
from inference.runtime.generate import Generator
from inference.runtime.kv_cache import calibrate_channel_scales, use_int8_kv_cache
from inference.runtime.quantize import quantize_linears
from tests.conftest import cpu_capabilities, run_under_capability
from tests.inference.runtime.engine.test_engine import prompts, staggered
from tests.inference.runtime.test_speculative import models

pytestmark = pytest.mark.slow  # torch.compile of every bucket

SIZES = (1, 4)


def target_in(weights: str, kv_cache: str):
    target, draft = models()
    if weights != "fp32":
        quantize_linears(target, weights, group_size=32)
    if kv_cache == "int8":
        use_int8_kv_cache(target)
    elif kv_cache == "int8-channel":
        use_int8_kv_cache(target, calibrate_channel_scales(target, [torch.randint(0, 512, (2, 40))]))
    return target, draft


def test_a_step_runs_in_the_smallest_bucket_that_holds_it():
    sizes = (1, 2, 4, 8, 64)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert bucket_for(65, sizes) is None and bucket_for(3, (4, 16)) == 4


@pytest.mark.parametrize("weights,kv_cache", [("fp32", "fp32"), ("int8", "int8"), ("int4", "int8-channel")])
def test_compiled_steps_give_the_eager_tokens_and_logits(weights, kv_cache):
    target, _ = target_in(weights, kv_cache)
    config = EngineConfig(max_batch=3, block_size=4, max_step_tokens=24, compile_sizes=SIZES, compile_autotune=False)
    eager, compiled = Engine(Generator(target), None, config), Engine(Generator(target), None, config)
    assert compiled.compile() > 0 and compiled.steps[0].compiled and not eager.steps[0].compiled
    ps = prompts(7, seed=1)
    requests = [(str(i), p, SamplingParams(max_new_tokens=6 + i, temperature=0)) for i, p in enumerate(ps)]
    want, got = staggered(eager, requests), staggered(compiled, requests)
    assert got.tokens == want.tokens and set(got.finish.values()) == {"length"}

    # logits on one cache state, from each graph: one token (bucket 1: the experts sparse), three sequences of one,
    # two and one new tokens (a padded bucket of 4: dense), and seven (the graph of dynamic size)
    engine = compiled
    tables = [[1, 2], [3, 4], [5]]
    prefix = runner.Batch.pack([Run(list(range(5, 12)), 0, tables[0]), Run(list(range(20, 25)), 0, tables[1])], 4)
    runner.forward(target, prefix, engine.caches[0], [], engine.experts[0])
    tolerance = 1e-4 if weights == "fp32" else 2e-2  # bf16 activations in the quantized kernels
    for runs in (
        [Run([7], 7, tables[0])],
        [Run([7], 7, tables[0]), Run([9, 11], 5, tables[1]), Run([3], 0, tables[2])],
        [Run([7], 7, tables[0]), Run([9, 11, 2], 5, tables[1]), Run([3, 4, 5], 0, tables[2])],
    ):
        batch = Batch.pack(runs, 4)
        logits_at = list(range(batch.ends[-1]))
        fast = engine.steps[0](batch, logits_at)
        ref = runner.forward(target, batch, engine.caches[0], logits_at, engine.experts[0])
        torch.testing.assert_close(fast, ref, rtol=tolerance, atol=tolerance * ref.abs().max().item())
        assert torch.equal(fast.argmax(-1), ref.argmax(-1))
        assert torch.equal(engine.steps[0](batch, logits_at[-1:]), fast[-1:])  # only the wanted rows
    assert engine.steps[0](Batch.pack([Run([1] * 25, 0, [6, 7, 8, 9, 10, 11, 12])], 4), [24]) is None  # > 24: eager
    if weights == "fp32":
        sampled_tokens_follow_the_eager_distribution(target, compiled)


def sampled_tokens_follow_the_eager_distribution(target, engine: Engine, n: int = 900) -> None:
    """Tokens sampled through the compiled graphs (top 6, temperature 1) against the eager model's distribution at
    the same position: a chi-square test over the 6 tokens (5 degrees of freedom; 20.5 is its 0.1% point)."""
    from collections import Counter

    from inference.runtime.generate import probabilities

    prompt, params = [11, 12, 13], SamplingParams(max_new_tokens=1, temperature=1.0, top_k=6)
    with torch.no_grad():
        p_V = probabilities(target(torch.tensor([prompt]))[0, -1:], params)[0]
    counts = Counter()
    for start in range(0, n, 60):
        for i in range(start, start + 60):
            engine.add(f"s{i}", prompt, params, lambda out: counts.update(out.token_ids))
        engine.run_until_done()
    assert sum(counts.values()) == n and set(counts) <= set(p_V.nonzero().flatten().tolist())
    expected = {t: n * p_V[t].item() for t in p_V.nonzero().flatten().tolist()}
    chi2 = sum((counts[t] - e) ** 2 / e for t, e in expected.items())
    assert chi2 < 20.5, (counts, expected)


def test_speculative_decoding_through_two_compiled_models_is_lossless():
    target, draft = models()
    config = EngineConfig(
        max_batch=2, block_size=4, gamma=2, max_step_tokens=24, compile_sizes=SIZES, compile_autotune=False
    )
    engine = Engine(Generator(target), Generator(draft), config)
    engine.compile()
    assert all(step.compiled for step in engine.steps)
    ps = prompts(4, seed=2)
    requests = [(str(i), p, SamplingParams(max_new_tokens=10, temperature=0)) for i, p in enumerate(ps)]
    out = staggered(engine, requests)
    ref = Generator(target)
    for i, p in enumerate(ps):
        assert out.tokens[str(i)] == ref.generate_ids(p, SamplingParams(max_new_tokens=10, temperature=0))
    assert engine.stats.spec_rounds > 0 and engine.stats.accepted > 0


def test_a_restart_reuses_the_compiled_graph_from_inductors_cache():
    """The same model compiled again after dynamo forgets everything (as a restarted server does) is read from
    inductor's FX graph cache, not compiled anew: the step's weights are plain tensors (no mkldnn prepacking)."""
    from torch._dynamo.utils import counters

    target, _ = target_in("fp32", "fp32")
    config = EngineConfig(max_batch=1, compile_sizes=(1,), compile_max_tokens=1, compile_autotune=False)
    Engine(Generator(target), None, config).compile()
    torch._dynamo.reset()
    hits = counters["inductor"]["fxgraph_cache_hit"]
    Engine(Generator(target), None, config).compile()
    assert counters["inductor"]["fxgraph_cache_hit"] == hits + 1, dict(counters["inductor"])


PROBE = """
import sys, torch
sys.path.insert(0, ".")
from tests.inference.runtime.engine.test_compiled import test_compiled_steps_give_the_eager_tokens_and_logits as t
t("int8", "int8")
print("ok")
"""


def test_compiled_int8_steps_run_under_every_cpu_capability():
    """Each capability below torch's own choice (which the test above runs in this process), in subprocesses
    started together: a crash in a native kernel fails the test with the signal's name."""
    others = cpu_capabilities()[:-1]
    if not others:
        pytest.skip("this machine runs one capability only, tested above")
    with ThreadPoolExecutor(len(others)) as pool:
        procs = list(pool.map(lambda c: run_under_capability(c, ["-c", PROBE], timeout=600), others))
    for capability, proc in zip(others, procs):
        assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (capability, proc.stderr[-3000:])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
