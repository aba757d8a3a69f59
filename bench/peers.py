"""Decode speed against peers, in one run: Frugal's engine (eager and compiled), llama.cpp (llama-cpp-python,
built by bench/build_llama_cpp.py) and Hugging Face transformers' `generate`, on the same dense weights; then
Frugal's MoE model eager against compiled, and speculative decoding against plain decoding of the release.

    .venv/bin/python bench/peers.py [--tokens 128] [--threads 2] [--repeats 3] [--sizes demo 100m]
        [--formats fp32 int8 int4] [--dense-only]
        [--dense-run data/dense_baseline_model] [--moe-run data/moe_model] [--package releases/...]
    (make bench-peers)

Dense weights: the demo's dense baseline (`--dense-run`, 3.3M parameters) and a dense config of about 91M
parameters (d 768, 12 layers, 12 heads, d_ff 2048, the demo's 8192-token vocabulary, random initialization:
speed does not depend on what the weights learned). Each is written to GGUF by inference.gguf_export (F32), and
llama.cpp's own quantizer makes Q8_0 and Q4_0 from it. Frugal's formats are quantized in memory from the same
fp32 weights: INT8 per channel, INT4 in groups of 32 (Q4_0's block width).

Every measurement: batch 1, greedy, `--tokens` new tokens after the same 16-token prompt, `--threads` threads,
wall time of the decode loop (not the prompt), the median of `--repeats` runs made in turn (engine A, B, C, A,
B, C, ...). Frugal runs through `Engine.step` (the server's own loop: scheduler, sampler, paged cache), eager
and compiled (one bucket of 1 token, inductor's autotuning on, compile time reported). llama.cpp runs through
llama-cpp-python's low-level API: `llama_decode` of one token and its greedy sampler, both in C.
transformers runs `LlamaForCausalLM.generate` (fp32 only) with `min_new_tokens` = `max_new_tokens`. Greedy tokens
are compared across engines on each fp32 model (they agree up to floating-point ties).

Memory bandwidth: the read rate of a 1 GiB `torch.sum` at `--threads` threads; a format's share of it is
weight bytes per token x tokens/s over that rate.

Results: bench/results/peers.json, bench/results/peers.png (ms per token per format and engine), Markdown
tables printed at the end, and a W&B run (offline unless WANDB_API_KEY is set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "peers.json"
PROMPT = [5, 17, 300, 42, 99, 1000, 7, 64, 128, 256, 512, 33, 901, 2048, 77, 8]
LLAMA_FORMATS = {"fp32": ("F32", None), "int8": ("Q8_0", 7), "int4": ("Q4_0", 2)}
"""Frugal format -> (llama.cpp format, its LLAMA_FTYPE)."""


def config_100m():
    from model.config import ModelConfig

    return ModelConfig(vocab_size=8192, d_model=768, n_layers=12, n_heads=12, max_seq_len=512, d_ff=2048,
                       n_dense_layers=12, n_routed_experts=0)  # fmt: skip


def read_bandwidth(threads: int) -> float:
    """GB/s of torch.sum over 1 GiB (best of 5)."""
    torch.set_num_threads(threads)
    x = torch.ones(256 * 1024 * 1024)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


# -- Frugal --------------------------------------------------------------------------------------------


class FrugalDecoder:
    """One model in an Engine, decoding one greedy request at a time; compiled for a batch of 1 or eager."""

    def __init__(self, model, compiled: bool):
        from inference.runtime.engine.engine import Engine, EngineConfig
        from inference.runtime.generate import Generator

        if compiled:  # the graphs of the models measured before go: their guards would be checked on every call
            torch._dynamo.reset()

        config = EngineConfig(max_batch=1, compile_sizes=(1,), proposer="none")
        self.engine = Engine(Generator(model.eval()), None, config)
        self.compile_s = self.engine.compile() if compiled else None

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        from inference.runtime.engine.sampler import SamplingParams

        out: list[int] = []
        self.engine.add("r", prompt, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True),
                        lambda o: out.extend(o.token_ids))  # fmt: skip
        self.engine.step()  # the prompt and the first token
        start = time.perf_counter()
        self.engine.run_until_done()
        return out, (time.perf_counter() - start) / (n - 1)


def frugal_model(base, fmt: str):
    import copy

    from inference.runtime.quantize import quantize_linears

    model = copy.deepcopy(base)
    if fmt != "fp32":
        quantize_linears(model, fmt, group_size=32)
    return model.eval()


# -- llama.cpp -----------------------------------------------------------------------------------------


class LlamaCppDecoder:
    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.ll = llama_cpp
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=64, verbose=False)  # fmt: skip
        self.sampler = llama_cpp.llama_sampler_init_greedy()

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        ll, llm = self.ll, self.llm
        ctx = llm._ctx.ctx
        llm.reset()
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        arr = (ll.llama_token * len(prompt))(*prompt)
        if ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(prompt))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        token = ll.llama_sampler_sample(self.sampler, ctx, -1)
        out, one = [token], (ll.llama_token * 1)()
        start = time.perf_counter()
        for _ in range(n - 1):
            one[0] = token
            if ll.llama_decode(ctx, ll.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            token = ll.llama_sampler_sample(self.sampler, ctx, -1)
            out.append(token)
        return out, (time.perf_counter() - start) / (n - 1)


# -- transformers --------------------------------------------------------------------------------------


class TransformersDecoder:
    def __init__(self, model):
        from inference.hf_export import to_hf

        self.hf = to_hf(model)

    @torch.no_grad()
    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        ids = torch.tensor([prompt])
        self.hf.generate(ids, max_new_tokens=1, do_sample=False)  # the prompt alone, timed apart
        start = time.perf_counter()
        out = self.hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        total = time.perf_counter() - start
        prefill_start = time.perf_counter()
        self.hf.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - prefill_start
        return out[0, len(prompt) :].tolist(), (total - prefill) / (n - 1)


# -- runs ----------------------------------------------------------------------------------------------


def interleaved(decoders: dict, prompt, n: int, repeats: int, bar) -> dict[str, dict]:
    times: dict[str, list[float]] = {name: [] for name in decoders}
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):
        for name, dec in decoders.items():
            out, s = dec.decode(prompt, n)
            times[name].append(s)
            tokens[name] = out
            bar.update(1)
    return {name: {"ms_per_token": 1e3 * statistics.median(t), "tokens_per_s": 1 / statistics.median(t),
                   "runs_ms": [1e3 * x for x in t], "tokens": tokens[name]} for name, t in times.items()}  # fmt: skip


def dense_size(label: str, base, tokenizer_json: Path, args, work: Path, bandwidth: float, bar) -> dict:
    from inference.gguf_export import llama_cpp_quantize, write_gguf
    from inference.runtime.quantize import weight_bytes

    f32 = write_gguf(base, tokenizer_json, work / f"{label}-f32.gguf")
    n_ctx = len(PROMPT) + args.tokens + 8
    rows = []
    for fmt, (ll_name, ftype) in LLAMA_FORMATS.items():
        if fmt not in args.formats:
            continue
        gguf = f32 if ftype is None else llama_cpp_quantize(f32, work / f"{label}-{ll_name}.gguf", ftype)
        model = frugal_model(base, fmt)
        compiled = FrugalDecoder(model, compiled=True)
        decoders = {"frugal eager": FrugalDecoder(model, compiled=False), "frugal compiled": compiled,
                    f"llama.cpp {ll_name}": LlamaCppDecoder(gguf, args.threads, n_ctx)}  # fmt: skip
        if fmt == "fp32":
            decoders["transformers generate"] = TransformersDecoder(base)
        bar.set_description(f"{label} {fmt}")
        results = interleaved(decoders, PROMPT, args.tokens, args.repeats, bar)
        llama = results[f"llama.cpp {ll_name}"]
        row = {"size": label, "format": fmt, "llama_format": ll_name, "weight_bytes": weight_bytes(model),
               "compile_s": compiled.compile_s, "results": results}  # fmt: skip
        for engine in ("frugal eager", "frugal compiled"):
            r = results[engine]
            r["vs_llama_cpp"] = r["ms_per_token"] / llama["ms_per_token"]
            r["bandwidth_share"] = row["weight_bytes"] * r["tokens_per_s"] / (bandwidth * 1e9)
        llama["bandwidth_share"] = os.path.getsize(gguf) * llama["tokens_per_s"] / (bandwidth * 1e9)
        if fmt == "fp32":
            ref = results["frugal eager"]["tokens"]
            row["same_tokens"] = {name: r["tokens"] == ref for name, r in results.items()}
        rows.append(row)
    return {"label": label, "params": sum(p.numel() for p in base.parameters()), "rows": rows}


def moe_speed(run: Path, args, bar) -> list[dict]:
    """The demo's MoE model, fp32 and INT8 (the release's format): today's Generator, the engine eager, the
    engine compiled."""
    from inference.runtime.generate import Generator, SamplingConfig
    from model.io import load_model

    class GeneratorDecoder:
        def __init__(self, model):
            self.gen = Generator(model)

        def decode(self, prompt, n):
            cfg = SamplingConfig(max_new_tokens=n)
            stream = self.gen.stream(prompt, cfg)
            out = [next(stream)]
            start = time.perf_counter()
            out += list(stream)
            return out, (time.perf_counter() - start) / (len(out) - 1)

    rows = []
    base = load_model(run)
    for fmt in ("fp32", "int8"):
        model = frugal_model(base, fmt)
        compiled = FrugalDecoder(model, compiled=True)
        decoders = {"Generator (eager)": GeneratorDecoder(model), "engine eager": FrugalDecoder(model, False),
                    "engine compiled": compiled}  # fmt: skip
        bar.set_description(f"moe {fmt}")
        results = interleaved(decoders, PROMPT, args.tokens, args.repeats, bar)
        eager = results["engine eager"]["ms_per_token"]
        rows.append({"format": fmt, "compile_s": compiled.compile_s, "results": results,
                     "speedup_vs_engine_eager": eager / results["engine compiled"]["ms_per_token"],
                     "speedup_vs_generator": results["Generator (eager)"]["ms_per_token"]
                     / results["engine compiled"]["ms_per_token"]})  # fmt: skip
    return rows


def speculative(package: Path, args, bar) -> dict:
    """The release at batch 1 on 8 held-out prompts of 16 tokens (the MoE run's validation rows), compiled: speculative
    (the package's gamma, adaptive) against plain decoding of the same target."""
    from inference.runtime.engine.engine import Engine, EngineConfig
    from inference.runtime.engine.sampler import SamplingParams
    from inference.runtime.package import load_package
    from training.data import run_validation_rows

    pkg = load_package(package)
    rows = torch.cat(list(run_validation_rows(args.moe_run).values()))
    limit = pkg.target.model.config.max_seq_len - args.tokens
    prompts = [row[: min(limit, 16)].tolist() for row in rows[:: max(1, len(rows) // 8)][:8]]
    out = {}
    for label, draft, sizes in (("plain", None, (1,)), ("speculative", pkg.draft, (1, 8))):
        proposer = "none" if label == "plain" else "auto"  # the package's own: its MTP modules, else its draft
        config = EngineConfig(max_batch=1, gamma=pkg.gamma, compile_sizes=sizes, proposer=proposer)
        torch._dynamo.reset()
        engine = Engine(pkg.target, draft, config)
        compile_s = engine.compile()
        tokens, seconds = [], 0.0
        for p in prompts:
            got: list[int] = []
            params = SamplingParams(max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
            engine.add("r", p, params, lambda o, got=got: got.extend(o.token_ids))
            start = time.perf_counter()
            engine.run_until_done()
            seconds += time.perf_counter() - start
            tokens.append(got)
            bar.update(1)
        stats = engine.stats
        out[label] = {"tokens_per_s": sum(map(len, tokens)) / seconds, "compile_s": compile_s, "tokens": tokens,
                      "acceptance": stats.accepted / stats.proposed if stats.proposed else None}  # fmt: skip
    out["speedup"] = out["speculative"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    out["identical"] = out["speculative"]["tokens"] == out["plain"]["tokens"]
    out["prompts"] = len(prompts)
    return out


# -- report --------------------------------------------------------------------------------------------


def tables(report: dict) -> str:
    head = f"Batch 1, greedy, {report['tokens']} new tokens, {report['threads']} threads, median of {report['repeats']}"
    lines = [f"{head} interleaved runs; read bandwidth {report['bandwidth_gb_s']:.1f} GB/s.", ""]
    for size in report["dense"]:
        lines += [f"**{size['label']}** ({size['params'] / 1e6:.1f}M parameters), ms per token (tokens/s):", "",
                  "| format | Frugal eager | Frugal compiled | llama.cpp | transformers | compiled / llama.cpp | "
                  "compiled's share of bandwidth | compile |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in size["rows"]:
            r = row["results"]
            cell = lambda x: f"{x['ms_per_token']:.2f} ({x['tokens_per_s']:.0f})"  # noqa: E731
            hf = r.get("transformers generate")
            lines.append(
                f"| {row['format']} / {row['llama_format']} | {cell(r['frugal eager'])} | {cell(r['frugal compiled'])} "
                f"| {cell(r['llama.cpp ' + row['llama_format']])} | {cell(hf) if hf else '-'} "
                f"| {r['frugal compiled']['vs_llama_cpp']:.2f}x | {r['frugal compiled']['bandwidth_share']:.0%} "
                f"| {row['compile_s']:.0f} s |"
            )
        fp32 = next((r for r in size["rows"] if r["format"] == "fp32"), None)
        if fp32:
            same = ", ".join(f"{k} {v}" for k, v in fp32["same_tokens"].items())
            lines += ["", f"fp32 greedy tokens equal to Frugal eager: {same}"]
        lines += [""]
    if report["moe"]:
        lines += ["**MoE** (the demo's model), ms per token:", "",
                  "| format | Generator (eager) | engine eager | engine compiled | compiled vs engine eager "
                  "| compile |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["moe"]:
        r = row["results"]
        lines.append(f"| {row['format']} | {r['Generator (eager)']['ms_per_token']:.2f} | "
                     f"{r['engine eager']['ms_per_token']:.2f} | {r['engine compiled']['ms_per_token']:.2f} | "
                     f"{row['speedup_vs_engine_eager']:.1f}x | {row['compile_s']:.0f} s |")  # fmt: skip
    spec = report.get("speculative")
    if spec:
        lines += ["", f"**Speculative decoding** (the release, compiled, {spec['prompts']} held-out prompts): "
                  f"{spec['speculative']['tokens_per_s']:.0f} tok/s against {spec['plain']['tokens_per_s']:.0f} plain "
                  f"({spec['speedup']:.2f}x), acceptance {spec['speculative']['acceptance']:.0%}, identical greedy "
                  f"output: {spec['identical']}."]  # fmt: skip
    return "\n".join(lines)


def chart(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["dense"]), figsize=(6 * len(report["dense"]), 4), squeeze=False)
    for ax, size in zip(axes[0], report["dense"]):
        engines = ["frugal eager", "frugal compiled", "llama.cpp"]
        width = 0.25
        for k, engine in enumerate(engines):
            ys = []
            for row in size["rows"]:
                key = engine if engine != "llama.cpp" else f"llama.cpp {row['llama_format']}"
                ys.append(row["results"][key]["ms_per_token"])
            ax.bar([i + (k - 1) * width for i in range(len(ys))], ys, width, label=engine)
        ax.set_xticks(range(len(size["rows"])), [f"{r['format']} / {r['llama_format']}" for r in size["rows"]])
        ax.set_ylabel("ms per token (batch 1)")
        ax.set_title(f"{size['label']} ({size['params'] / 1e6:.0f}M)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_wandb(report: dict, png: Path) -> str | None:
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project="frugal", job_type="bench-peers", name="peers", mode=mode, dir=str(ROOT))
    table = wandb.Table(columns=["size", "format", "engine", "ms_per_token", "tokens_per_s"])
    for size in report["dense"]:
        for row in size["rows"]:
            for engine, r in row["results"].items():
                table.add_data(size["label"], row["format"], engine, r["ms_per_token"], r["tokens_per_s"])
    run.log({"peers/decode": table, "peers/chart": wandb.Image(str(png))})
    folder = run.dir
    run.finish()
    return str(Path(folder).parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", choices=("demo", "100m"), default=["demo", "100m"])
    parser.add_argument("--formats", nargs="+", choices=tuple(LLAMA_FORMATS), default=list(LLAMA_FORMATS))
    parser.add_argument("--dense-only", action="store_true", help="leave out the MoE and speculative sections")
    parser.add_argument("--dense-run", type=Path, default=ROOT / "data" / "dense_baseline_model")
    parser.add_argument("--moe-run", type=Path, default=ROOT / "data" / "moe_model")
    parser.add_argument("--package", type=Path, help="default: the newest release under releases/")
    parser.add_argument("--no-wandb", action="store_true")
    args = parser.parse_args()

    import llama_cpp  # noqa: F401  (installed by bench/build_llama_cpp.py: make llama-cpp)

    from model.io import load_model
    from model.transformer import Transformer

    torch.set_num_threads(args.threads)
    package = args.package or max((ROOT / "releases").glob("*/package"), key=lambda p: p.stat().st_mtime)
    bandwidth = read_bandwidth(args.threads)
    tokenizer_json = args.dense_run / "tokenizer.json"
    steps = args.repeats * (4 + 3 + 3) * len(args.sizes) + args.repeats * 3 * 2 + 16
    report = {"tokens": args.tokens, "threads": args.threads, "repeats": args.repeats, "bandwidth_gb_s": bandwidth,
              "cpu": torch.backends.cpu.get_cpu_capability(), "dense": [], "moe": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=steps, unit="run") as bar:
        for label in args.sizes:
            if label == "demo":
                base = load_model(args.dense_run).eval()
            else:
                torch.manual_seed(0)
                base = Transformer(config_100m()).eval()
            report["dense"].append(dense_size(label, base, tokenizer_json, args, Path(tmp), bandwidth, bar))
        if not args.dense_only:
            report["moe"] = moe_speed(args.moe_run, args, bar)
            report["speculative"] = speculative(package, args, bar)
    text = tables(report)
    png = chart(report, OUT.with_suffix(".png"))
    report["wandb"] = None if args.no_wandb else log_wandb(report, png)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"\n{OUT}\n{png}")


if __name__ == "__main__":
    main()
