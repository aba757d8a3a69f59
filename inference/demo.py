"""What `make demo` ends with: the benchmark table, then text from the published package (the quantized MoE
model): seeded samples (temperature, top-p and a frequency penalty, which keeps a small model from repeating
itself), decoded together by the serving engine; then the check that speculative decoding is lossless (greedy
text with and without speculation, identical: by the MTP modules of a target that has them, else by the
draft), with speed and acceptance rate. A difference fails the command (exit 1).

python -m inference.demo [--package releases/<name>-<version>/package] [--kv-cache fp32|int8|int8-channel]
(the newest release under releases/ by default)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from inference.runtime.kv_cache import KV_CACHES
from inference.runtime.package import load_package

PROMPTS = ("The function returns", "This module provides")
SAMPLE_PROMPTS = ("The function returns", "This module provides", "Once upon a time", "The results show")
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "frequency_penalty": 0.5}


def newest_release(releases: Path) -> Path:
    packages = sorted(releases.glob("*/package"), key=lambda p: p.stat().st_mtime)
    if not packages:
        raise SystemExit(f"{releases}: no release: materialize inference_package first")
    return packages[-1]


def samples(package, max_new_tokens: int) -> dict[str, str]:
    """Seeded samples of SAMPLE_PROMPTS, decoded as one batch by the engine (with the draft); printed and
    returned by prompt."""
    from inference.runtime.engine.engine import Engine, EngineConfig
    from inference.runtime.engine.sampler import SamplingParams

    tok = package.target.tokenizer
    engine = Engine(package.target, package.draft, EngineConfig(gamma=package.gamma))
    out: dict[str, list[int]] = {p: [] for p in SAMPLE_PROMPTS}
    for seed, prompt in enumerate(SAMPLE_PROMPTS):
        params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed, **SAMPLING)
        engine.add(prompt, tok.encode(prompt).ids, params, lambda o: out[o.request_id].extend(o.token_ids))
    start = time.perf_counter()
    engine.run_until_done()
    seconds = time.perf_counter() - start
    settings = ", ".join(f"{k} {v}" for k, v in SAMPLING.items())
    n = sum(map(len, out.values()))
    print(f"\nsamples ({settings}, seeds 0-{len(SAMPLE_PROMPTS) - 1}; one batch: {n / seconds:.1f} tok/s):")
    texts = {p: tok.decode(ids) for p, ids in out.items()}
    for prompt, text in texts.items():
        print(f"  {prompt}{text}".replace("\n", "\n    "))
    return texts


def main(argv: list[str] | None = None) -> None:
    data = Path(os.environ.get("FRUGAL_DATA_DIR", "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help="a package folder (default: the newest under releases/)")
    parser.add_argument("--releases", type=Path, default=Path("releases"))
    parser.add_argument("--report", type=Path, default=data / "benchmark_report" / "report.md")
    parser.add_argument("--kv-cache", choices=KV_CACHES, help="default: the package's")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    if args.report.exists():
        print(f"Benchmark ({args.report}):\n\n{args.report.read_text()}")
    torch.manual_seed(0)
    package = load_package(args.package or newest_release(args.releases), kv_cache=args.kv_cache)
    target, draft = package.target, package.draft
    print(
        f"package {package.root} ({package.name} {package.meta['version']}: {package.meta['scheme']} weights, "
        f"{args.kv_cache or package.meta['kv_cache']} KV cache), verified against its manifest"
    )
    samples(package, args.max_new_tokens)
    from inference.runtime.engine.engine import Engine, EngineConfig

    plain_engine = Engine(target, None, EngineConfig(proposer="none"))
    spec_engine = Engine(target, draft, EngineConfig(gamma=package.gamma))  # the package's MTP modules, else its draft
    who = {"mtp": "its MTP modules", "draft": "the draft"}.get(spec_engine.proposer, "nothing")
    print(f"\nspeculative decoding is lossless: greedy text with and without speculation (proposed by {who})")
    mismatches = []
    for prompt in PROMPTS:
        ids = target.tokenizer.encode(prompt).ids
        plain, t_plain = greedy(plain_engine, ids, args.max_new_tokens)
        fast, t_spec = greedy(spec_engine, ids, args.max_new_tokens)
        print(f"\nprompt: {prompt!r}")
        print(f"  plain       ({len(plain) / t_plain:6.1f} tok/s): {target.tokenizer.decode(plain)!r}")
        print(f"  speculative ({len(fast) / t_spec:6.1f} tok/s): {target.tokenizer.decode(fast)!r}")
        print(f"  identical: {plain == fast}")
        if plain != fast:
            mismatches.append(prompt)
    s = spec_engine.stats
    rounds = s.spec_rounds + s.plain_rounds
    print(
        f"\nspeculative decoding by {who}, adaptive gamma up to {spec_engine.gamma}: acceptance rate "
        f"{s.accepted / max(1, s.proposed):.2f}, {(s.accepted + rounds) / max(1, rounds):.2f} tokens per target "
        f"forward pass, {s.proposed} proposals in {rounds} rounds"
    )
    if mismatches:  # a lossy speculation is a broken release: the command fails, as CI's demo run checks
        print(f"\nLOSSLESS CHECK FAILED: speculation changed the greedy text of {mismatches}", file=sys.stderr)
        raise SystemExit(1)
    print("\nlossless check passed: speculation changed no greedy token")


def greedy(engine, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """One greedy request through `engine`: its tokens and the seconds they took."""
    from inference.runtime.engine.sampler import SamplingParams

    out: list[int] = []
    engine.add(f"greedy-{time.perf_counter_ns()}", ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
               lambda o: out.extend(o.token_ids))  # fmt: skip
    start = time.perf_counter()
    engine.run_until_done()
    return out, time.perf_counter() - start


if __name__ == "__main__":
    main()
