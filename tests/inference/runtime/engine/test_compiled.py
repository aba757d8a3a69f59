"""The compiled step (inference.runtime.engine.compiled) against the eager packed forward
(inference.runtime.engine.runner): the same greedy tokens for requests that join and leave a batch, and close logits
on the same cache, for fp32, INT8 and INT4 weights and the fp32, INT8 and INT8-per-channel caches; speculative
decoding through two compiled models; and, for the INT8 weights (torch's native kernels), the same under every
ATEN_CPU_CAPABILITY this machine runs, each in a subprocess, so that a crash fails the test.

A compile takes tens of seconds on 2 cores, so every engine here compiles one bucket of 4 tokens (it serves
batches of 1 to 4 tokens through padding; longer prompt chunks run eager beside it), without inductor's
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

SIZES = (4,)


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

    # logits on one cache state: three sequences of one, two and one new tokens (a padded bucket of 4)
    engine = compiled
    tables = [[1, 2], [3, 4], [5]]
    prefix = runner.Batch.pack([Run(list(range(5, 12)), 0, tables[0]), Run(list(range(20, 25)), 0, tables[1])], 4)
    runner.forward(target, prefix, engine.caches[0], [], engine.experts[0])
    batch = Batch.pack([Run([7], 7, tables[0]), Run([9, 11], 5, tables[1]), Run([3], 0, tables[2])], 4)
    logits_at = [0, 1, 2, 3]
    fast = engine.steps[0](batch, logits_at)
    ref = runner.forward(target, batch, engine.caches[0], logits_at, engine.experts[0])
    tolerance = 1e-4 if weights == "fp32" else 2e-2  # bf16 activations in the quantized kernels
    torch.testing.assert_close(fast, ref, rtol=tolerance, atol=tolerance * ref.abs().max().item())
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))
    assert engine.steps[0](Batch.pack([Run([1] * 5, 0, [6, 7])], 4), [4]) is None  # 5 tokens: eager


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
