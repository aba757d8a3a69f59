"""The cost waterfall: what each lever of Frugal's recipe does to the price of a served token, measured in one run
on one workload, against llama.cpp serving the same models.

Rows (each adds one lever to the row before; `waterfall_rows`):

1. the equal-quality dense model (training.scaling) in fp32, decoded by transformers' `generate` at batch 1;
2. the same model on Frugal's engine (inference.runtime.engine), eager, batch 1;
3. compiled (the engine's compiled decode step);
4. served with continuous batching at `concurrency` requests;
5. the MoE model instead of the dense one;
6. INT8, then INT4 weights (quantized_model);
7. speculative decoding with the quantized draft, on the cheaper of the two formats of row 6;
8. prefix caching.

Peer rows: llama.cpp (inference.llama_cpp_peer) serving the equal-quality dense model and Frugal's own MoE
export (glm4moe) as GGUF Q8_0 and Q4_K_M, at batch 1 and with `concurrency` parallel slots.

**The workload.** Every request is one shared system prompt (`system_tokens` held-out tokens) followed by
`prompt_tokens` tokens of held-out text of its own, and decodes exactly `new_tokens` greedy tokens. A pass
serves `requests` requests, `concurrency` at a time (a closed loop: a finished request's place goes to the
next). Each row runs an untimed warm-up pass, then `repeats` times a prefill pass (the same number of fresh
requests with one new token each: the cost of reading input) and a decode pass (fresh requests again). No
two passes share a user prompt, so the prefix cache can only reuse the system prompt, as it would in service.

**Per row** (medians over the repeats, each repeat's $ kept for the noise):
- output tokens/s: output tokens over the decode pass's wall time;
- p50/p95 time per output token over the requests ((last token - first) / (tokens - 1), as vLLM reports it),
  and p50 time to first token;
- $ per 1M output tokens: price per hour x (decode pass - prefill pass seconds) / output tokens;
- $ per 1M input tokens: price per hour x prefill pass seconds / input tokens, over all input tokens, with
  the share the prefix cache served; the uncached price divides by the uncached tokens only (cached input
  costs no compute; its price is the memory it holds, not measured here);
- held-out perplexity of the row's model, from its own engine (transformers' logits, Frugal's forward
  through the KV cache, llama.cpp's logits).

Each row is measured in a fresh process (`python -m inference.cost --row ...`) so that its warm-up and
compilation belong to it alone.
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.io import atomic_dir, atomic_file, md_table, read_tensors, save_tensors

OnToken = Callable[[int, int], None]
"""on_token(request index, tokens delivered now)."""


@dataclass
class Row:
    label: str
    lever: str
    """What this row adds to the one before."""
    engine: str
    """transformers, frugal or llama.cpp."""
    model: str
    """A run folder (transformers, frugal) or a GGUF file (llama.cpp)."""
    quality_of: str
    """Which model's quality this is: dense (the equal-quality dense model) or moe."""
    draft: str | None = None
    compiled: bool = False
    concurrency: int = 1
    prefix_caching: bool = False
    peer: bool = False
    after: str | None = None
    """The label of the row this one adds its lever to; None = the waterfall row just before it."""
    proposer: str | None = None
    """Who proposes speculative tokens (inference.runtime.engine.engine.EngineConfig.proposer); None = the draft
    when the row has one, else none (a target's MTP modules propose only where a row asks for "mtp")."""


@dataclass
class CostWorkload:
    rows_NT: torch.Tensor
    """Held-out token rows, for perplexity."""
    system: list[int]
    prompts: list[list[int]]
    """User parts, one per request of every pass; passes take consecutive slices of `requests`."""
    requests: int
    new_tokens: int
    repeats: int
    gamma: int = 4
    threads: int = 2
    compile_autotune: bool = True
    """inductor's kernel autotuning in the compiled rows (inference.runtime.engine.EngineConfig)."""

    @classmethod
    def build(cls, rows_NT: torch.Tensor, system_tokens: int, prompt_tokens: int, requests: int, new_tokens: int,
              repeats: int, gamma: int, threads: int, compile_autotune: bool = True) -> CostWorkload:  # fmt: skip
        """The system prompt from the first row, user parts from windows of the others (and of the first row's
        remainder), as many as (1 + 2 x repeats) passes need; they repeat only if the rows run out."""
        first = rows_NT[0].tolist()
        system = first[:system_tokens]
        windows = []
        for k, row in enumerate(rows_NT.tolist()):
            start = system_tokens if k == 0 else 0
            windows += [row[i : i + prompt_tokens] for i in range(start, len(row) - prompt_tokens + 1, prompt_tokens)]
        if not windows:
            raise ValueError(f"held-out rows of {rows_NT.shape[1]} tokens hold no prompt of {prompt_tokens} tokens")
        needed = (1 + 2 * repeats) * requests
        prompts = [windows[i % len(windows)] for i in range(needed)]
        return cls(rows_NT, system, prompts, requests, new_tokens, repeats, gamma, threads, compile_autotune)

    def passes(self) -> list[list[list[int]]]:
        n = self.requests
        return [[self.system + p for p in self.prompts[i * n : (i + 1) * n]] for i in range(1 + 2 * self.repeats)]

    @property
    def max_tokens_per_request(self) -> int:
        return max(len(self.system) + len(p) for p in self.prompts) + self.new_tokens

    def save(self, folder: Path) -> None:
        with atomic_dir(folder) as staging:
            save_tensors({"rows": self.rows_NT.contiguous()}, staging / "rows.safetensors")
            meta = {k: v for k, v in dataclasses.asdict(self).items() if k != "rows_NT"}
            (staging / "workload.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> CostWorkload:
        meta = json.loads((folder / "workload.json").read_text())
        return cls(read_tensors(folder / "rows.safetensors")["rows"], **meta)


# -- the engines ---------------------------------------------------------------------------------------


class TransformersServer:
    """transformers' generate at batch 1, one request after another (what a newcomer runs)."""

    def __init__(self, row: Row, workload: CostWorkload):
        from inference.hf_export import to_hf
        from model.io import load_model

        self.hf = to_hf(load_model(row.model)).eval()
        self.cached = 0

    @torch.no_grad()
    def serve(self, prompts: list[list[int]], new_tokens: int, on_token: OnToken) -> None:
        from transformers.generation.streamers import BaseStreamer

        class Streamer(BaseStreamer):
            def __init__(self, request: int):
                self.request, self.prompt_seen = request, False

            def put(self, value):
                if self.prompt_seen:
                    on_token(self.request, value.numel())
                self.prompt_seen = True

            def end(self):
                pass

        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=Streamer(i))  # fmt: skip

    @torch.no_grad()
    def perplexity(self, rows_NT: torch.Tensor) -> float:
        nll = sum(
            torch.nn.functional.cross_entropy(
                self.hf(rows[:, :-1]).logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"
            ).item()
            for rows in rows_NT.split(8)
        )
        return math.exp(nll / rows_NT[:, 1:].numel())


class FrugalServer:
    """Frugal's engine: eager or compiled, batch `concurrency`, with or without the draft and prefix caching."""

    def __init__(self, row: Row, workload: CostWorkload):
        from inference.runtime.engine.compiled import bucket_for
        from inference.runtime.engine.engine import Engine, EngineConfig
        from inference.runtime.generate import Generator

        self.target = Generator.from_run(row.model)
        draft = Generator.from_run(row.draft) if row.draft else None
        # the bucket of a whole batch of decoding requests, which every pass runs at (its requests start and end
        # together); a step of fewer requests (a pass's last) runs eager rather than cost a compilation of its own.
        # A speculative row also compiles the graph of dynamic size, for its verification rounds of c (gamma + 1)
        # tokens; prompt chunks beyond run eager in every row
        c = row.concurrency
        sizes = (bucket_for(c) or c,)
        proposer = row.proposer or ("draft" if draft else "none")
        rounds = c * (workload.gamma + 1) if proposer != "none" else sizes[0]
        config = EngineConfig(max_batch=row.concurrency, max_queue=max(64, workload.requests),
                              prefix_caching=row.prefix_caching, gamma=workload.gamma, compile_sizes=sizes,
                              compile_max_tokens=max(rounds, sizes[0]), compile_autotune=workload.compile_autotune,
                              proposer=proposer)  # fmt: skip
        self.engine = Engine(self.target, draft, config)
        self.compile_s = self.engine.compile() if row.compiled else None
        self.cached = 0

    def serve(self, prompts: list[list[int]], new_tokens: int, on_token: OnToken) -> None:
        from inference.runtime.engine.sampler import SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        seen: set[int] = set()

        def deliver(i: int, out) -> None:
            if i not in seen:
                seen.add(i)
                self.cached += out.cached_tokens
            if out.token_ids:
                on_token(i, len(out.token_ids))

        for i, prompt in enumerate(prompts):
            self.engine.add(f"r{time.perf_counter_ns()}-{i}", prompt, params, lambda o, i=i: deliver(i, o))
        self.engine.run_until_done()

    def perplexity(self, rows_NT: torch.Tensor) -> float:
        from inference.evaluate import perplexity

        return perplexity(self.target.model, rows_NT)[0]


class LlamaCppRowServer:
    def __init__(self, row: Row, workload: CostWorkload):
        from inference.llama_cpp_peer import LlamaCppServer

        self.path, self.threads = row.model, workload.threads
        self.server = LlamaCppServer(row.model, row.concurrency, workload.max_tokens_per_request, workload.threads)

    @property
    def cached(self) -> int:
        return self.server.cached_tokens

    def serve(self, prompts: list[list[int]], new_tokens: int, on_token: OnToken) -> None:
        self.server.run(prompts, new_tokens, lambda request, token: on_token(request, 1))

    def perplexity(self, rows_NT: torch.Tensor) -> float:
        from inference.llama_cpp_peer import llama_cpp_perplexity

        return llama_cpp_perplexity(self.path, rows_NT, self.threads)


SERVERS = {"transformers": TransformersServer, "frugal": FrugalServer, "llama.cpp": LlamaCppRowServer}


# -- one row -------------------------------------------------------------------------------------------


def timed_pass(server, prompts: list[list[int]], new_tokens: int) -> dict:
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    count: Counter = Counter()

    def on_token(i: int, n: int) -> None:
        now = time.perf_counter()
        first.setdefault(i, now)
        last[i] = now
        count[i] += n

    cached_before = server.cached
    start = time.perf_counter()
    server.serve(prompts, new_tokens, on_token)
    wall = time.perf_counter() - start
    tpot = sorted((last[i] - first[i]) / (count[i] - 1) for i in count if count[i] > 1)
    ttft = sorted(first[i] - start for i in first)
    return {
        "seconds": wall,
        "output_tokens": sum(count.values()),
        "input_tokens": sum(map(len, prompts)),
        "cached_tokens": server.cached - cached_before,
        "tpot_p50_ms": 1e3 * percentile(tpot, 0.5) if tpot else None,
        "tpot_p95_ms": 1e3 * percentile(tpot, 0.95) if tpot else None,
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure_row(row: Row, workload: CostWorkload) -> dict:
    """One row in this process (run it in a fresh one: see `run_rows`)."""
    torch.set_num_threads(workload.threads)
    server = SERVERS[row.engine](row, workload)
    passes = workload.passes()
    timed_pass(server, passes[0], workload.new_tokens)  # warm-up: first calls, and the system prompt cached
    repeats = []
    for r in range(workload.repeats):
        prefill = timed_pass(server, passes[1 + 2 * r], 1)
        decode = timed_pass(server, passes[2 + 2 * r], workload.new_tokens)
        repeats.append({"prefill": prefill, "decode": decode})
    return {
        "row": dataclasses.asdict(row),
        "repeats": repeats,
        "perplexity": server.perplexity(workload.rows_NT),
        "compile_s": getattr(server, "compile_s", None),
        "threads": torch.get_num_threads(),
    }


def run_rows(rows: list[Row], workload: CostWorkload, work_dir: Path, log=print) -> list[dict]:
    """Measure each row in a fresh process; a failed row raises with its stderr."""
    folder = Path(work_dir) / "cost_workload"
    workload.save(folder)
    results = []
    for row in rows:
        log(f"measuring {row.label} ...")
        cmd = [
            sys.executable,
            "-m",
            "inference.cost",
            "--workload",
            str(folder),
            "--row",
            json.dumps(dataclasses.asdict(row)),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"measuring {row.label} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


# -- from measurements to costs ------------------------------------------------------------------------


def usd_per_million(seconds: float, tokens: int, price_per_hour: float) -> float:
    return price_per_hour * seconds / 3600 / tokens * 1e6


def costs(result: dict, price_per_hour: float) -> dict:
    """A row's medians over its repeats, and each repeat's $ per 1M output tokens."""
    per_repeat = []
    for rep in result["repeats"]:
        p, d = rep["prefill"], rep["decode"]
        decode_only = max(d["seconds"] - p["seconds"], 0.01 * d["seconds"])
        uncached = p["input_tokens"] - p["cached_tokens"]
        per_repeat.append({
            "output_tokens_per_s": d["output_tokens"] / d["seconds"],
            "output_usd_per_1m": usd_per_million(decode_only, d["output_tokens"], price_per_hour),
            "input_usd_per_1m": usd_per_million(p["seconds"], p["input_tokens"], price_per_hour),
            "uncached_input_usd_per_1m": usd_per_million(p["seconds"], max(uncached, 1), price_per_hour),
            "cached_share": p["cached_tokens"] / p["input_tokens"],
            "tpot_p50_ms": d["tpot_p50_ms"], "tpot_p95_ms": d["tpot_p95_ms"], "ttft_p50_ms": d["ttft_p50_ms"],
        })  # fmt: skip
    med = {k: statistics.median(r[k] for r in per_repeat) for k in per_repeat[0]}
    out = [r["output_usd_per_1m"] for r in per_repeat]
    return {
        **med,
        "output_usd_per_1m_repeats": out,
        "output_usd_spread": (max(out) - min(out)) / med["output_usd_per_1m"],
    }


def table(results: list[dict], price_per_hour: float) -> list[dict]:
    """Rows with costs, and factors against the row before (the waterfall's own rows) and against row 1."""
    rows, base, prev, by_label = [], None, None, {}
    for r in results:
        row = {**r["row"], **costs(r, price_per_hour), "perplexity": r["perplexity"], "compile_s": r["compile_s"]}
        if not row["peer"]:
            base = base or row
            prev = by_label[row["after"]] if row["after"] else prev
            row["factor_vs_previous"] = prev["output_usd_per_1m"] / row["output_usd_per_1m"] if prev else 1.0
            prev = by_label[row["label"]] = row
        row["factor_vs_row1"] = base["output_usd_per_1m"] / row["output_usd_per_1m"]
        rows.append(row)
    return rows


def headline(rows: list[dict], tolerance: float) -> dict:
    """Frugal's best against row 1 and against llama.cpp's best on the equal-quality dense model; 'equal or
    better quality' = held-out perplexity at most row 1's x exp(tolerance) (the seed noise, in nats)."""
    base = rows[0]
    limit = base["perplexity"] * math.exp(tolerance)
    good = [r for r in rows if r["perplexity"] <= limit]
    frugal = [r for r in good if not r["peer"] and r is not base]
    peers = [r for r in good if r["peer"] and r["quality_of"] == "dense"]
    out: dict = {"quality_limit": limit, "row1": base["label"], "row1_usd": base["output_usd_per_1m"]}
    if not frugal:
        out["best"] = None
        return out
    best = min(frugal, key=lambda r: r["output_usd_per_1m"])
    out |= {"best": best["label"], "best_usd": best["output_usd_per_1m"],
            "vs_row1": ratio_with_noise(base, best)}  # fmt: skip
    if peers:
        peer = min(peers, key=lambda r: r["output_usd_per_1m"])
        out |= {"peer": peer["label"], "peer_usd": peer["output_usd_per_1m"], "vs_peer": ratio_with_noise(peer, best)}
    return out


def ratio_with_noise(slower: dict, faster: dict) -> dict:
    """How many times cheaper `faster` is per output token: median, and the range over repeat pairs."""
    pairs = [a / b for a, b in zip(slower["output_usd_per_1m_repeats"], faster["output_usd_per_1m_repeats"])]
    return {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs), "repeats": len(pairs)}


COLUMNS = (
    "#", "configuration", "adds", "val ppl", "out tok/s", "p50 ms/tok", "p95 ms/tok", "TTFT p50 ms",
    "$ / 1M out", "$ / 1M in (cached share)", "$ / 1M uncached in", "vs previous", "vs row 1",
)  # fmt: skip


def cells(rows: list[dict]) -> list[list[str]]:
    out, n = [], 0
    for r in rows:
        n += 0 if r["peer"] else 1
        out.append([
            "peer" if r["peer"] else str(n), r["label"], r["lever"], f"{r['perplexity']:.2f}",
            f"{r['output_tokens_per_s']:.1f}", fmt_ms(r["tpot_p50_ms"]), fmt_ms(r["tpot_p95_ms"]),
            fmt_ms(r["ttft_p50_ms"]),
            f"{r['output_usd_per_1m']:.4f} (±{50 * r['output_usd_spread']:.0f}%)",
            f"{r['input_usd_per_1m']:.5f} ({r['cached_share']:.0%})", f"{r['uncached_input_usd_per_1m']:.5f}",
            "" if r["peer"] else f"{r['factor_vs_previous']:.2f}x", f"{r['factor_vs_row1']:.2f}x",
        ])  # fmt: skip
    return out


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(rows: list[dict]) -> str:
    return md_table(COLUMNS, cells(rows))


def waterfall_chart(rows: list[dict], path: Path, title: str) -> Path:
    """$ per 1M output tokens down the waterfall (log scale), each bar labelled with its factor against the row
    before; the peers beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
    labels = [("llama.cpp: " if r["peer"] else "") + r["label"] for r in rows]
    values = [r["output_usd_per_1m"] for r in rows]
    colors = ["tab:gray" if r["peer"] else "tab:blue" if k == 0 else
              "tab:green" if r["factor_vs_previous"] >= 1 else "tab:red" for k, r in enumerate(rows)]  # fmt: skip
    ax.barh(labels, values, color=colors)
    for y, r in enumerate(rows):
        note = (
            f"{r['factor_vs_row1']:.2f}x vs row 1"
            if r["peer"]
            else (f"{r['factor_vs_previous']:.2f}x vs previous, {r['factor_vs_row1']:.2f}x vs row 1")
        )
        ax.text(r["output_usd_per_1m"], y, "  " + note, va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 1.5, max(values) * 12)  # room for the labels
    ax.invert_yaxis()
    ax.set_xlabel("$ per 1M output tokens (log scale; blue: row 1; green: the lever helped, red: it cost more)")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure one row of the cost waterfall (called by run_rows).")
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--row", required=True, help="a Row as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(measure_row(Row(**json.loads(args.row)), CostWorkload.load(args.workload))))


if __name__ == "__main__":
    main()
