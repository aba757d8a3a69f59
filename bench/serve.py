"""Serving benchmark: frugal-serve's continuous batching under 1, 4, 16 and 64 concurrent streaming
clients, for the release (speculative, as it ships; and plain batched decoding of the same weights, compiled
and eager: the decode step before and after inference.runtime.engine.compiled) and for the dense fp32 baseline served
the same way; prefix-cache hits; what a generated token costs.

    .venv/bin/python bench/serve.py [--package PATH] [--baseline-run data/dense_baseline_model]
        [--concurrency 1 4 16 64] [--requests 64] [--max-tokens 64] [--threads 1] [--price-per-hour 0.10]
        [--compile-sizes 1,4,16,64]

Every compiled server compiles its step for --compile-sizes at start-up (minutes on 2 cores; not counted).

Each configuration is its own server process (`python -m inference.runtime.serve --port 0`, 127.0.0.1, --threads
torch threads), checked with the official openai client and warmed up, then driven by C client threads
(plain HTTP streaming, as vLLM's benchmark_serving drives a server; the openai client's per-chunk parsing
costs as much CPU as the server on this 2-core machine), temperature 0, ignore_eos so that every request
decodes exactly --max-tokens, sending max(--requests, C) requests,
prompts cycling through a few English sentences. Per level: generated tokens/s over the wall
time from the first request to the last answer; p50 and p95 time to first token and time per output
token (per request: (end - first token) / (tokens - 1)); $/1M tokens at --price-per-hour.

Prefix caching (release, one client): for each of 8 fresh 200-token prefixes, a cold request (prefix + a
question) then a warm one (the same prefix + another question); time to first token, median of both.

Results: bench/results/serve.json, bench/results/serve.png (throughput against per-token latency, one
point per concurrency level, per configuration; logged to W&B with the table), and the Markdown tables
printed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import select
import statistics
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
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "serve.json"
PROMPTS = ("The function returns", "This module provides", "Once upon a time", "The results show")
WORDS = (
    "river", "stone", "lantern", "quiet", "harbor", "signal", "copper", "meadow", "orbit", "ledger", "canvas",
    "thunder", "beacon", "willow", "cipher", "marble", "falcon", "ember", "prism", "summit",
)  # fmt: skip


@contextmanager
def running_server(package: Path, threads: int, *flags: str) -> Iterator[tuple[str, int]]:
    """A frugal-serve process on a free port: (model name, port); stopped on exit."""
    cmd = [sys.executable, "-m", "inference.runtime.serve", "--package", str(package), "--port", "0", "--threads",
           str(threads), *flags]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            ready, _, _ = select.select([server.stdout], [], [], 3600)  # compiling takes minutes
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


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"[{v}]" for v in s.labels.values())
            out[key] = s.value
    return out


def stream_one(port: int, name: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion over plain HTTP (a light client, as vLLM's benchmark_serving uses:
    the openai client's per-chunk parsing would compete with the server for the same two cores): time to
    first token, total time, tokens and the usage."""
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:500]!r}")
    first, usage = None, {}
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter()
        usage = chunk.get("usage") or usage
    end = time.perf_counter()
    conn.close()
    first, tokens = first or end, usage.get("completion_tokens", 0)
    return {"ttft": first - start, "total": end - start, "tokens": tokens, "usage": usage,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else float("nan")}  # fmt: skip


def measure(port: int, name: str, concurrency: int, n_requests: int, max_tokens: int, price: float) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(lambda i: stream_one(port, name, PROMPTS[i % 4], max_tokens), range(n_requests)))
    seconds = time.perf_counter() - start
    tokens = sum(a["tokens"] for a in answers)
    tokens_per_s = tokens / seconds
    ttft, tpot = [a["ttft"] for a in answers], [a["tpot"] for a in answers if math.isfinite(a["tpot"])]
    return {
        "concurrency": concurrency, "requests": n_requests, "tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "ttft_p50_ms": 1000 * percentile(ttft, 0.5), "ttft_p95_ms": 1000 * percentile(ttft, 0.95),
        "tpot_p50_ms": 1000 * percentile(tpot, 0.5), "tpot_p95_ms": 1000 * percentile(tpot, 0.95),
        "usd_per_1m_tokens": price / (tokens_per_s * 3600) * 1e6,
    }  # fmt: skip


def prefix_ttft(port: int, name: str, n: int = 8, prefix_tokens: int = 200) -> dict:
    """Cold and warm time to first token for requests that share a fresh prefix of about prefix_tokens."""
    tokenize = f"http://127.0.0.1:{port}/tokenize"
    cold, warm, cached = [], [], []
    for i in range(n):
        words, text = [], ""
        while True:  # grow a fresh prefix until it is prefix_tokens long
            words.append(WORDS[(i * 7 + len(words) * 3 + len(words) // 20) % len(WORDS)] + str(i))
            text = " ".join(words)
            request = urllib.request.Request(tokenize, json.dumps({"prompt": text}).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request) as response:
                if json.loads(response.read())["count"] >= prefix_tokens:
                    break
        for bucket, question in ((cold, " Question one:"), (warm, " Question two:")):
            answer = stream_one(port, name, text + question, max_tokens=2)
            bucket.append(answer["ttft"])
            if bucket is warm:
                cached.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"])
    return {"cold_ttft_ms": 1000 * statistics.median(cold), "warm_ttft_ms": 1000 * statistics.median(warm),
            "warm_over_cold": statistics.median(warm) / statistics.median(cold),
            "cached_tokens_median": statistics.median(cached)}  # fmt: skip


def bench_config(label: str, package: Path, flags: list[str], args, with_prefix: bool) -> dict:
    with running_server(package, args.threads, *flags) as (name, port):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        out = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert out.usage.completion_tokens >= 1  # the official client speaks to it; the load uses plain HTTP
        for _ in range(2):
            stream_one(port, name, PROMPTS[0], args.max_tokens)
        levels = []
        for c in tqdm(args.concurrency, desc=label, unit="level"):
            before = scrape(port)
            level = measure(port, name, c, max(args.requests, c), args.max_tokens, args.price_per_hour)
            after = scrape(port)
            delta = {k: after[k] - before.get(k, 0.0) for k in after if k.endswith("_total") or "_total[" in k}
            steps = delta.get("frugal_engine_steps_total", 0)
            level["mean_batch"] = delta.get("frugal_engine_scheduled_requests_total", 0) / steps if steps else 0.0
            level["spec_rounds"] = delta.get("frugal_spec_decode_rounds_total[speculative]", 0)
            level["plain_rounds"] = delta.get("frugal_spec_decode_rounds_total[plain]", 0)
            proposed = delta.get("frugal_spec_decode_num_draft_tokens_total", 0)
            level["acceptance"] = (
                delta.get("frugal_spec_decode_num_accepted_tokens_total", 0) / proposed if proposed else None
            )
            level["tokens_per_step"] = level["tokens"] / steps if steps else None
            levels.append(level)
            tqdm.write(f"{label} at {c} clients: {level['tokens_per_s']:.1f} tokens/s")
        prefix = prefix_ttft(port, name) if with_prefix else None
    return {"label": label, "name": name, "package": str(package), "flags": flags, "levels": levels, "prefix": prefix}


def package_run(run_dir: Path, out: Path) -> Path:
    """A trained run folder as a package (its fp32 weights, no draft): a baseline to serve."""
    from inference.release import assemble

    meta = {"name": f"{run_dir.name}-fp32", "version": "0", "scheme": "fp32", "kv_cache": "fp32", "gamma": 4}
    assemble(out, run_dir, None, meta, f"# {run_dir.name} (fp32, unquantized): the serving baseline\n")
    return out


def tables(runs: list[dict]) -> str:
    lines = [
        "| configuration | clients | tokens/s | x one client | TTFT p50 / p95 ms | per-token p50 / p95 ms | mean batch "
        "| accepted | plain rounds | $ / 1M tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        one = run["levels"][0]["tokens_per_s"]
        for r in run["levels"]:
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
            rounds = r["spec_rounds"] + r["plain_rounds"]
            plain = f"{r['plain_rounds'] / rounds:.0%}" if rounds and run["label"] != "dense fp32 baseline" else "-"
            lines.append(
                f"| {run['label']} | {r['concurrency']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / one:.1f}x | "
                f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p95_ms']:.1f} | "
                f"{r['mean_batch']:.1f} | {acc} | {plain} | {r['usd_per_1m_tokens']:.4f} |"
            )
    for run in runs:
        if run["prefix"]:
            p = run["prefix"]
            lines.append(
                f"\n{run['label']}: a 200-token shared prefix: time to first token {p['cold_ttft_ms']:.1f} ms cold, "
                f"{p['warm_ttft_ms']:.1f} ms warm ({p['warm_over_cold']:.0%}), {p['cached_tokens_median']:.0f} "
                "prompt tokens from the cache (medians of 8)"
            )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for run in runs:
        x = [r["tokens_per_s"] for r in run["levels"]]
        for ax, key in zip(axes, ("tpot_p50_ms", "tpot_p95_ms")):
            y = [r[key] for r in run["levels"]]
            ax.plot(x, y, marker="o", label=run["label"])
            for r, xi, yi in zip(run["levels"], x, y):
                ax.annotate(str(r["concurrency"]), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, title in zip(axes, ("p50", "p95")):
        ax.set_xlabel("generated tokens/s (all clients)")
        ax.set_ylabel(f"{title} time per output token (ms)")
        ax.set_title(f"throughput against {title} per-token latency (labels: clients)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_wandb(runs: list[dict], chart: Path) -> str | None:
    """The table and the chart in a W&B run (offline unless WANDB_API_KEY is set); its folder."""
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project="frugal", job_type="bench-serve", name="serve", mode=mode, dir=str(ROOT))
    columns = ["configuration", "clients", "tokens_per_s", "tpot_p50_ms", "tpot_p95_ms", "ttft_p50_ms", "usd_per_1m"]
    table = wandb.Table(columns=columns)
    for r in runs:
        for lv in r["levels"]:
            table.add_data(r["label"], lv["concurrency"], lv["tokens_per_s"], lv["tpot_p50_ms"], lv["tpot_p95_ms"],
                           lv["ttft_p50_ms"], lv["usd_per_1m_tokens"])  # fmt: skip
    run.log({"serve/levels": table, "serve/throughput_vs_latency": wandb.Image(str(chart))})
    folder = run.dir
    run.finish()
    return str(Path(folder).parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help="a package folder (default: the newest under releases/)")
    parser.add_argument("--baseline-run", type=Path, default=ROOT / "data" / "dense_baseline_model",
                        help="the dense fp32 run, packaged as it is (no draft)")  # fmt: skip
    parser.add_argument("--price-per-hour", type=float, default=0.10, help="dollars per hour of this machine")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least C)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=1, help="each server's torch threads")
    parser.add_argument("--compile-sizes", default="1,4,16,64",
                        help="the servers' compiled batch sizes (frugal-serve --compile-sizes)")  # fmt: skip
    parser.add_argument("--no-wandb", action="store_true")
    args = parser.parse_args()
    if args.package is None:
        from inference.demo import newest_release

        args.package = newest_release(ROOT / "releases")
    baseline = package_run(args.baseline_run, OUT.parent / "serve" / "baseline-package")
    batch = ["--max-batch", str(max(args.concurrency))]
    compiled = [*batch, "--compile-sizes", args.compile_sizes]
    runs = [
        bench_config("release, plain, eager", args.package, [*batch, "--no-speculative", "--no-compile"], args,
                     with_prefix=False),
        bench_config("release, speculative", args.package, compiled, args, with_prefix=True),
        bench_config("release, plain", args.package, [*compiled, "--no-speculative"], args, with_prefix=False),
        bench_config("dense fp32 baseline", baseline, compiled, args, with_prefix=False),
    ]  # fmt: skip
    chart = OUT.with_suffix(".png")
    plot(runs, chart)
    summary = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs,
        "chart": str(chart),
        "wandb": None if args.no_wandb else log_wandb(runs, chart),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(OUT)
    print(tables(runs))


if __name__ == "__main__":
    main()
