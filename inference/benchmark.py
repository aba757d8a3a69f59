"""Measuring served configurations side by side: quality, speed and memory.

A `Config` is a model folder (trained run, quantized folder or package role), an optional draft, a KV
cache and a dtype. `run` measures each one in a fresh process (`python -m inference.benchmark --one ...`),
so peak memory and warm-up belong to that configuration alone, on one shared `Workload`: held-out token
rows (perplexity and bits per byte, decoded through the KV cache) and prompts (batch 1, greedy, streamed,
timed per token). Per configuration and decoding mode (plain, speculative):

- tokens/s and ms/token over all prompts; time to first token (prefill + first step); p50/p95 latency
  per token (the gaps between streamed tokens: a speculative round's accepted burst arrives at once);
- peak resident memory from loading to the end of decoding, and weight bytes;
- acceptance rate and tokens per target pass; the forward-pass costs that bound speculation;
- bytes read per token (inference.evaluate.ByteCounter), for the bandwidth roofline.

Used by bench/inference.py (every weight and KV-cache format). The benchmark_report asset's cost waterfall is
inference.cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.evaluate import ByteCounter, PeakMemory, perplexity
from inference.runtime.generate import Generator, SamplingConfig
from inference.runtime.quantize import weight_bytes
from inference.runtime.speculative import SpeculativeGenerator
from model.io import atomic_dir, read_tensors, save_tensors


@dataclass
class Config:
    label: str
    target: str
    draft: str | None = None
    kv_cache: str = "fp32"
    dtype: str = "fp32"
    """fp32 as saved, or bf16 (a full-precision folder cast after loading)."""


@dataclass
class Workload:
    rows_NT: torch.Tensor
    """Held-out token rows (each T tokens: T - 1 predictions)."""
    prompts: list[list[int]]
    new_tokens: int = 48
    gamma: int = 4

    def save(self, folder: Path) -> None:
        with atomic_dir(folder) as staging:
            save_tensors({"rows": self.rows_NT.contiguous()}, staging / "rows.safetensors")
            meta = {"prompts": self.prompts, "new_tokens": self.new_tokens, "gamma": self.gamma}
            (staging / "workload.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> Workload:
        meta = json.loads((folder / "workload.json").read_text())
        return cls(read_tensors(folder / "rows.safetensors")["rows"], **meta)


@dataclass
class Timed:
    tokens: int
    seconds: float
    first_token_s: list[float]
    gaps_s: list[float]
    bytes_read: int
    outputs: list[list[int]]

    def summary(self) -> dict:
        gaps = sorted(self.gaps_s) or [float("nan")]
        return {
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.seconds,
            "ms_per_token": 1e3 * self.seconds / self.tokens,
            "ttft_ms": 1e3 * statistics.median(self.first_token_s),
            "p50_ms": 1e3 * gaps[len(gaps) // 2],
            "p95_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))],
            "bytes_per_token": self.bytes_read / self.tokens,
        }


def timed_streams(stream: Callable[[list[int]], Iterator[int]], prompts: list[list[int]], counted) -> Timed:
    """Stream each prompt at batch 1, timing every token (after one untimed warm-up); bytes read are
    counted on a second, untimed pass (the hooks would slow the timed one)."""
    list(stream(prompts[0]))
    outputs, first, gaps, seconds = [], [], [], 0.0
    for prompt in prompts:
        start = last = time.perf_counter()
        out = []
        for token in stream(prompt):
            now = time.perf_counter()
            (gaps if out else first).append(now - last)
            out.append(token)
            last = now
        seconds += last - start
        outputs.append(out)
    with ByteCounter(*counted) as counter:
        for prompt in prompts:
            list(stream(prompt))
    return Timed(sum(map(len, outputs)), seconds, first, gaps, counter.bytes, outputs)


def forward_ms(model, tokens: int, position: int = 64, repeats: int = 30) -> float:
    """Median wall time of one cached forward pass of `tokens` new positions after `position` cached ones
    (at most half the context)."""
    position = min(position, model.config.max_seq_len // 2)
    cache = model.new_cache(1, position + tokens)
    with torch.no_grad():
        model(torch.ones(1, position, dtype=torch.long), 0, cache)
        x = torch.full((1, tokens), 7)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, position, cache)
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def load_generator(folder: str, kv_cache: str, dtype: str) -> Generator:
    gen = Generator.from_run(folder, kv_cache=kv_cache)
    if dtype == "bf16":
        gen.model.to(torch.bfloat16)
    return gen


def bits_per_byte(nll: float, rows_NT: torch.Tensor, tokenizer) -> float:
    """Mean nats per predicted token → bits per UTF-8 byte of the predicted text."""
    n_bytes = sum(len(tokenizer.decode(row[1:].tolist(), skip_special_tokens=False).encode()) for row in rows_NT)
    return nll * rows_NT[:, 1:].numel() / math.log(2) / n_bytes


def measure(config: Config, workload: Workload) -> dict:
    """One configuration, in this process (run it in a fresh one: see `run`)."""
    cfg = SamplingConfig(max_new_tokens=workload.new_tokens)
    result: dict = {"config": dataclasses.asdict(config)}
    with PeakMemory() as plain_peak:
        target = load_generator(config.target, config.kv_cache, config.dtype)
        plain = timed_streams(lambda p: target.stream(p, cfg), workload.prompts, (target.model,))
    t_bytes = weight_bytes(target.model)
    result["plain"] = {**plain.summary(), "weight_bytes": t_bytes, "peak_bytes": plain_peak.bytes}
    if config.draft:
        with PeakMemory() as spec_peak:
            draft = load_generator(config.draft, config.kv_cache, config.dtype)
            spec = SpeculativeGenerator(target, draft, gamma=workload.gamma)
            fast = timed_streams(lambda p: spec.stream(p, cfg), workload.prompts, (target.model, draft.model))
        costs = {
            "target_1": forward_ms(target.model, 1),
            "target_verify": forward_ms(target.model, workload.gamma + 1),
            "draft_1": forward_ms(draft.model, 1),
        }
        g = workload.gamma
        costs["ceiling"] = (g + 1) * costs["target_1"] / (g * costs["draft_1"] + costs["target_verify"])
        result["speculative"] = {
            **fast.summary(),
            "weight_bytes": t_bytes + weight_bytes(draft.model),
            "peak_bytes": plain_peak.bytes + spec_peak.bytes,
            # stats cover the warm-up, the timed and the counting passes: the same prompts each time
            "acceptance_rate": spec.stats.acceptance_rate,
            "mean_accepted_length": spec.stats.mean_accepted_length,
            "forward_ms": costs,
        }
        result["identical"] = plain.outputs == fast.outputs
    ppl, nll = perplexity(target.model, workload.rows_NT)
    result |= {
        "perplexity": ppl,
        "nll": nll,
        "bits_per_byte": bits_per_byte(nll, workload.rows_NT, target.tokenizer),
        "val_tokens": int(workload.rows_NT[:, 1:].numel()),
        "threads": torch.get_num_threads(),
    }
    return result


def run(configs: list[Config], workload: Workload, work_dir: Path, log=print) -> dict[str, dict]:
    """Measure each configuration in a fresh process; results by label."""
    workload.save(Path(work_dir) / "workload")
    results = {}
    for config in configs:
        log(f"measuring {config.label} ...")
        cmd = [sys.executable, "-m", "inference.benchmark", "--workload", str(Path(work_dir) / "workload")]
        out = subprocess.run([*cmd, "--one", json.dumps(dataclasses.asdict(config))], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"measuring {config.label} failed:\n{out.stderr[-3000:]}")
        results[config.label] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure one configuration (called by inference.benchmark.run).")
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--one", required=True, help="a Config as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(measure(Config(**json.loads(args.one)), Workload.load(args.workload))))


if __name__ == "__main__":
    main()
