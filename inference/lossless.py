"""The release gate's losslessness check: greedy decoding through the engine that frugal-serve ships (continuous
batching, the compiled step, its own proposer: the target's MTP modules, else the draft) gives exactly the tokens
that the same engine gives without speculation.

Speculative decoding is lossless by construction (a proposal is kept only where it equals the target's own greedy
token), so any difference is a bug in what ships: a verification step that runs through another graph, a KV
cache rolled back wrongly, a proposal accepted past a mismatch. The check therefore runs the shipped path, batched
and compiled; the eager `SpeculativeGenerator` stays the reference that the tests hold the engine to, and the
eager greedy tokens are reported beside (a compiled graph may round differently from the eager one, so that
comparison is information, not the gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True, slots=True)
class LosslessReport:
    identical: bool
    """Every prompt's greedy tokens with speculation equal those without."""
    proposer: str
    """Who proposed: mtp, draft or none (a target with neither has nothing to check)."""
    acceptance_rate: float
    compile_s: float
    matches_eager: bool
    """The compiled engine's plain tokens equal the eager Generator's (information: see the module docstring)."""
    first_difference: list[int | None]
    """Per prompt, the first position where speculative and plain tokens differ (None: identical)."""
    plain: list[list[int]]
    speculative: list[list[int]]


def greedy_batch(engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """All prompts added at once and decoded greedily together (the batched path a server runs)."""
    from inference.runtime.engine.sampler import SamplingParams

    outs: list[list[int]] = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        engine.add(f"lossless-{i}", prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                   lambda o, i=i: outs[i].extend(o.token_ids))  # fmt: skip
    engine.run_until_done()
    return outs


def first_difference(a: list[int], b: list[int]) -> int | None:
    diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return diff if diff is not None or len(a) == len(b) else min(len(a), len(b))


def check_lossless(
    target_dir: str | Path,
    draft_dir: str | Path | None,
    prompts: list[list[int]],
    max_new_tokens: int = 24,
    kv_cache: str = "fp32",
    gamma: int = 4,
    autotune: bool = False,
) -> LosslessReport:
    """Greedy tokens of `prompts` from the compiled engine with and without speculation (and eager, for the
    report). autotune: inductor's kernel autotuning, frugal-serve's default (its --fast-compile turns it off); it
    chooses among GEMM kernels for speed, and costs minutes of compilation."""
    from inference.runtime.engine.compiled import bucket_for
    from inference.runtime.engine.engine import Engine, EngineConfig
    from inference.runtime.generate import Generator, SamplingConfig

    target = Generator.from_run(target_dir, kv_cache=kv_cache)
    draft = Generator.from_run(draft_dir) if draft_dir is not None else None
    n = len(prompts)
    # the buckets these prompts run in, decoding together and verifying gamma + 1 tokens each (the server compiles
    # 1, 4, 8 and 16; a bucket this batch never uses would only cost compilation); rounds past 16 tokens run the
    # graph of dynamic size, prompt chunks past both eager
    rounds = n * (gamma + 1)
    sizes = tuple(sorted({b for b in (bucket_for(n), bucket_for(rounds)) if b is not None})) or (n,)
    config = {"compile_autotune": autotune, "compile_sizes": sizes, "compile_max_tokens": max(sizes[-1], rounds),
              "max_batch": max(n, 1)}  # fmt: skip
    plain_engine = Engine(target, None, EngineConfig(proposer="none", **config))
    spec_engine = Engine(target, draft, EngineConfig(gamma=gamma, **config))
    compile_s = plain_engine.compile() + spec_engine.compile()
    plain = greedy_batch(plain_engine, prompts, max_new_tokens)
    fast = greedy_batch(spec_engine, prompts, max_new_tokens)
    eager = [target.generate_ids(p, SamplingConfig(max_new_tokens=max_new_tokens)) for p in prompts]
    s = spec_engine.stats
    return LosslessReport(
        identical=plain == fast,
        proposer=spec_engine.proposer,
        acceptance_rate=s.accepted / max(1, s.proposed),
        compile_s=compile_s,
        matches_eager=plain == eager,
        first_difference=[first_difference(a, b) for a, b in zip(plain, fast)],
        plain=plain,
        speculative=fast,
    )
