"""Serving benchmark: frugal-serve under 1, 4 and 16 concurrent clients, and what a generated token costs.

    .venv/bin/python bench/serve.py --package PATH [--baseline PATH] [--price-per-hour 0.10] [--requests 32]
                                    [--max-tokens 32] [--concurrency 1 4 16] [--threads N]

For each package (--package, then --baseline if given) a server is started as its own process
(`python -m inference.serve --package PATH --port 0`, on 127.0.0.1, speculative decoding as the package
ships it), warmed up with one request, then driven by C client threads (the official openai client, one
shared connection pool) at each concurrency C: max(--requests, C) greedy completions of --max-tokens
tokens, prompts cycling through a few short English sentences. The server decodes one request at a time,
so concurrency measures queueing and HTTP overhead, not batching.

Per package and concurrency: requests/s and generated tokens/s (over the wall time from the first request
sent to the last answer), p50 and p95 request latency (nearest rank), and the price of a million generated
tokens on a machine rented at --price-per-hour dollars: price_per_hour / (tokens/s * 3600) * 1e6. With
--baseline, the cost ratio at each concurrency is baseline $/1M / package $/1M (above 1: the package is
cheaper). The client threads share the machine with the server, as a local client would.

Results: bench/results/serve.json, and the Markdown tables printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "serve.json"
PROMPTS = ("The function returns", "This module provides", "Once upon a time", "The results show")


@contextmanager
def running_server(package: Path, threads: int | None) -> Iterator[tuple[str, int]]:
    """A frugal-serve process on a free port: (model name, port); stopped on exit."""
    cmd = [sys.executable, "-m", "inference.serve", "--package", str(package), "--port", "0"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            ready, _, _ = select.select([server.stdout], [], [], 300)
            line = server.stdout.readline() if ready else ""
            if not line.startswith("serving "):
                log.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} did not start: {line!r}\n{log.read()}")
            _, name, _, url = line.split()
            yield name, int(url.rsplit(":", 1)[1])
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def measure(client: OpenAI, name: str, concurrency: int, n_requests: int, max_tokens: int, price: float) -> dict:
    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        prompt = PROMPTS[i % len(PROMPTS)]
        out = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - start, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(one, range(n_requests)))
    seconds = time.perf_counter() - start
    latencies = [latency for latency, _ in answers]
    tokens = sum(n for _, n in answers)
    tokens_per_s = tokens / seconds
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "tokens": tokens,
        "seconds": seconds,
        "requests_per_s": n_requests / seconds,
        "tokens_per_s": tokens_per_s,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p95_ms": 1000 * percentile(latencies, 0.95),
        "usd_per_1m_tokens": price / (tokens_per_s * 3600) * 1e6,
    }


def bench_package(package: Path, args: argparse.Namespace) -> dict:
    with running_server(package, args.threads) as (name, port):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=args.max_tokens, temperature=0)
        levels = []
        for c in args.concurrency:
            levels.append(measure(client, name, c, max(args.requests, c), args.max_tokens, args.price_per_hour))
            print(f"{name} at {c} clients: {levels[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
            speculative = json.loads(response.read())["speculative"]
    return {"package": str(package), "name": name, "speculative": speculative, "levels": levels}


def tables(runs: dict[str, dict], ratios: dict[int, float] | None) -> str:
    lines = [
        "| package | clients | requests | requests/s | tokens/s | p50 ms | p95 ms | $ / 1M tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for role, run in runs.items():
        for r in run["levels"]:
            lines.append(
                f"| {run['name']} ({role}) | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                f"{r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['usd_per_1m_tokens']:.4f} |"
            )
    for role, run in runs.items():
        spec = run["speculative"]
        if spec["enabled"]:
            lines.append(
                f"\n{run['name']} ({role}): speculative, gamma {spec['gamma']}, acceptance rate "
                f"{spec['acceptance_rate']:.3f}, {spec['mean_accepted_length']:.2f} tokens per target pass"
            )
    if ratios is not None:
        base, pkg = runs["baseline"], runs["package"]
        lines += [
            "",
            f"| clients | {base['name']} $ / 1M | {pkg['name']} $ / 1M | cost ratio (baseline / package) |",
            "|---:|---:|---:|---:|",
        ]
        for b, p in zip(base["levels"], pkg["levels"]):
            c = p["concurrency"]
            lines.append(f"| {c} | {b['usd_per_1m_tokens']:.4f} | {p['usd_per_1m_tokens']:.4f} | {ratios[c]:.2f}x |")
    return "\n".join(lines)


def package_run(run_dir: Path, out: Path) -> Path:
    """A trained run folder as a package (its fp32 weights, no draft): a baseline to serve."""
    from inference.release import assemble

    meta = {"name": f"{run_dir.name}-fp32", "version": "0", "scheme": "fp32", "kv_cache": "fp32", "gamma": 4}
    assemble(out, run_dir, None, meta, f"# {run_dir.name} (fp32, unquantized): the serving baseline\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help="a package folder (default: the newest under releases/)")
    parser.add_argument("--baseline", type=Path, help="a second package to compare costs with")
    parser.add_argument(
        "--baseline-run", type=Path, help="or a trained run folder (e.g. data/dense_baseline_model), packaged as it is"
    )
    parser.add_argument("--price-per-hour", type=float, default=0.10, help="dollars per hour of this machine")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least C)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, help="the servers' torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.package is None:
        from inference.demo import newest_release

        args.package = newest_release(ROOT / "releases")
    if args.baseline_run is not None:
        args.baseline = package_run(args.baseline_run, OUT.parent / "serve" / "baseline-package")
    runs = {"package": bench_package(args.package, args)}
    ratios = None
    if args.baseline is not None:
        runs["baseline"] = bench_package(args.baseline, args)
        ratios = {
            p["concurrency"]: b["usd_per_1m_tokens"] / p["usd_per_1m_tokens"]
            for b, p in zip(runs["baseline"]["levels"], runs["package"]["levels"])
        }
    summary = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs,
        "cost_ratio_baseline_over_package": ratios,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(OUT)
    print(tables(runs, ratios))


if __name__ == "__main__":
    main()
