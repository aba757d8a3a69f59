"""Where one decoding step's time goes: the engine's step at batches 1/4/16/64, for the demo's dense baseline and
its MoE model, split into the graph, host packing, sampling, the rest of the engine, IPC and the server.

    .venv/bin/python bench/step_profile.py [--dense-run data/dense_baseline_model] [--moe-run data/moe_model]
        [--batches 1 4 16 64] [--steps 24] [--threads 2] [--autotune] [--out bench/results/step_profile.json]
    (make bench-step)

Each (model, batch) gets an Engine whose compiled step is built for that batch (autotuning off unless
`--autotune`), B requests of 16-token prompts, greedy, no speculation; once every request decodes, `--steps` steps
are timed with the parts below measured inside each step (wrapping the engine's own functions, so nothing is
re-implemented):

- graph: the model's forward: the compiled graph's call (`CompiledStep._run`), or the eager packed forward
  (`runner.forward`) when the step does not fit a compiled size;
- pack: building the step's tensors on the host (`Batch.pack`, `CompiledStep._inputs`);
- sample: choosing each request's token and emitting it (`spec_decode.accept`, `Engine._emit`);
- engine, other: the rest of `Engine.step` (scheduling, block bookkeeping, delivery);
- IPC: what the engine process sends the server after a step (`inference.runtime.engine.process`): the step's
  outputs and a snapshot, pickled through a multiprocessing pipe and read back;
- server: what the server does per delivered output, as `frugal-serve` streams it: its StopText (incremental
  detokenization and the stop-string check, `Serving._push`) and one SSE chunk serialized as the server does.

ms per token = (step + IPC + server) / B. Results: the JSON file and a Markdown table printed at the end.

    .venv/bin/python bench/step_profile.py --compare before-1.json before-2.json -- after-1.json after-2.json

prints the median of each side's runs side by side (the machine's noise between runs is larger than some
differences: run the two code versions in turn, several times).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PARTS = ("graph", "pack", "sample", "engine", "ipc", "server")


class Timers:
    """Seconds per part, accumulated while `active`."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.active = False

    def wrap(self, owner, name: str, part: str, static: str | None = None) -> None:
        fn = getattr(owner, name).__func__ if static == "classmethod" else getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            if not timers.active:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.seconds[part] += time.perf_counter() - start

        setattr(owner, name, classmethod(timed) if static == "classmethod" else timed)

    @contextmanager
    def on(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


def instrument(timers: Timers) -> None:
    from inference.runtime.engine import compiled, engine, runner, spec_decode

    timers.wrap(compiled.CompiledStep, "_run", "graph")
    timers.wrap(runner, "forward", "graph")
    timers.wrap(runner.Batch, "pack", "pack", static="classmethod")
    timers.wrap(compiled.CompiledStep, "_inputs", "pack")
    timers.wrap(spec_decode, "accept", "sample")
    timers.wrap(engine.Engine, "_emit", "sample")


def server_cost(outputs: list, texts: dict, tokenizer) -> float:
    """Seconds the server spends on a step's outputs: each token through its request's StopText, and one SSE
    chunk per output, serialized as inference.runtime.server.app's `stream` does."""
    from inference.runtime.server.serving import StopText

    start = time.perf_counter()
    for out in outputs:
        text = texts.setdefault(out.request_id, StopText(tokenizer, ()))
        piece = "".join(text.push(t) for t in out.token_ids)
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": out.finish_reason}
        base = {"id": out.request_id, "object": "text_completion", "created": 0, "model": "frugal"}
        b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"
    return time.perf_counter() - start


def ipc_cost(pipe, outputs: list, engine) -> float:
    """Seconds to send a step's message from the engine process and read it back in the server's."""
    receive, send = pipe
    start = time.perf_counter()
    send.send(("outputs", outputs, engine.snapshot()))
    receive.recv()
    return time.perf_counter() - start


def profile(run: Path, batch: int, steps: int, autotune: bool, timers: Timers, pipe) -> dict:
    from inference.runtime.engine.engine import Engine, EngineConfig
    from inference.runtime.engine.sampler import SamplingParams
    from inference.runtime.generate import Generator

    gen = Generator.from_run(run)
    options = dict(max_batch=batch, max_queue=batch, proposer="none", compile_sizes=(batch,), compile_autotune=autotune,
                   prefix_caching=False)  # fmt: skip
    if "compile_max_tokens" in {f.name for f in dataclasses.fields(EngineConfig)}:  # only the decoding graph
        options["compile_max_tokens"] = batch
    config = EngineConfig(**options)
    engine = Engine(gen, None, config)
    compile_s = engine.compile()
    outputs: list = []
    params = SamplingParams(max_new_tokens=steps + 16, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    vocab = gen.model.config.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, vocab, (16,), generator=g).tolist()
        engine.add(f"r{i}", prompt, params, outputs.append)
    while any(s.prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(4):  # warm: the first decoding steps
        engine.step()
    outputs.clear()
    timers.seconds.clear()
    texts: dict = {}
    wall = ipc = server = 0.0
    for _ in range(steps):
        with timers.on():
            start = time.perf_counter()
            engine.step()
            wall += time.perf_counter() - start
        ipc += ipc_cost(pipe, outputs, engine)
        server += server_cost(outputs, texts, gen.tokenizer)
        outputs.clear()
    assert len(engine.scheduler.running) == batch, "every request decodes through the timed steps"
    ms = {part: 1e3 * timers.seconds[part] / steps for part in ("graph", "pack", "sample")}
    ms["engine"] = 1e3 * wall / steps - sum(ms.values())
    ms["ipc"], ms["server"] = 1e3 * ipc / steps, 1e3 * server / steps
    step_ms = sum(ms.values())
    return {"batch": batch, "compile_s": round(compile_s, 1), "step_ms": step_ms, "ms_per_token": step_ms / batch,
            "ms": ms}  # fmt: skip


def table(results: list[dict]) -> str:
    head = "| model | batch | step ms | ms/token | " + " | ".join(PARTS) + " |"
    lines = [head, "|" + "---|" * (4 + len(PARTS))]
    for r in results:
        parts = " | ".join(f"{r['ms'][p]:.2f} ({100 * r['ms'][p] / r['step_ms']:.0f}%)" for p in PARTS)
        lines.append(f"| {r['model']} | {r['batch']} | {r['step_ms']:.2f} | {r['ms_per_token']:.3f} | {parts} |")
    return "\n".join(lines)


def compare(before: list[Path], after: list[Path]) -> str:
    """Median step ms and graph ms per (model, batch) over each side's result files, side by side."""
    import statistics

    def medians(paths: list[Path]) -> dict:
        runs = [json.loads(p.read_text())["results"] for p in paths]
        keys = [(r["model"], r["batch"]) for r in runs[0]]
        out = {}
        for i, key in enumerate(keys):
            rows = [run[i] for run in runs]
            out[key] = {"step": statistics.median(r["step_ms"] for r in rows),
                        "graph": statistics.median(r["ms"]["graph"] for r in rows),
                        "host": statistics.median(r["step_ms"] - r["ms"]["graph"] for r in rows)}  # fmt: skip
        return out

    b, a = medians(before), medians(after)
    lines = ["| model | batch | step ms before | after | graph ms before | after | host ms before | after | "
             "step before / after |", "|" + "---|" * 9]  # fmt: skip
    for key in b:
        x, y = b[key], a[key]
        lines.append(f"| {key[0]} | {key[1]} | {x['step']:.2f} | {y['step']:.2f} | {x['graph']:.2f} | {y['graph']:.2f} "
                     f"| {x['host']:.2f} | {y['host']:.2f} | {x['step'] / y['step']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    if "--compare" in sys.argv:
        files = sys.argv[sys.argv.index("--compare") + 1 :]
        split = files.index("--")
        print(compare([Path(f) for f in files[:split]], [Path(f) for f in files[split + 1 :]]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense-run", type=Path, default=ROOT / "data" / "dense_baseline_model")
    parser.add_argument("--moe-run", type=Path, default=ROOT / "data" / "moe_model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autotune", action="store_true", help="inductor's GEMM autotuning (slower to compile)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_profile.json")
    args = parser.parse_args()
    for run in (args.dense_run, args.moe_run):
        if not (run / "config.json").exists():
            sys.exit(f"{run}: no trained run (make demo trains it)")
    torch.set_num_threads(args.threads)
    timers = Timers()
    instrument(timers)
    pipe = multiprocessing.Pipe(duplex=False)
    results = []
    for label, run in (("dense", args.dense_run), ("moe", args.moe_run)):
        for batch in args.batches:
            print(f"{label} batch {batch} ...", file=sys.stderr, flush=True)
            results.append({"model": label, **profile(run, batch, args.steps, args.autotune, timers, pipe)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"threads": args.threads, "steps": args.steps, "autotune": args.autotune, "results": results,
              "torch": torch.__version__}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1))
    print(table(results))
    print(f"\n{args.out}")


if __name__ == "__main__":
    main()
