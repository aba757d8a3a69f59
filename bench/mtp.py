"""MTP benchmark: DeepSeek-V3's multi-token prediction trained with the MoE against training without it, and MTP
self-speculation against the separate distilled draft model, in one run on the same tokens and seeds.

Usage: python bench/mtp.py [--steps 300] [--seeds 0 1] [--depth 2] [--mtp-distill 0.5] [--data-dir data]
(or `make bench-mtp`)

Needs the curriculum shards and tokenizer that `make demo` builds (FRUGAL_DATA_DIR). Trains, each a real
`python -m training.train` process with moe_model's settings (small_cpu, seq_len 128, batch 8), per seed:
- the MoE without MTP;
- with `--depth` MTP modules (MoE blocks, lambda 0.3), DeepSeek-V3's plain cross-entropy;
- the same, self-distilled (mtp_distill_weight `--mtp-distill`: part of each depth's loss is the KL to the main
  head's distribution);
and once the separate draft (small_cpu_draft, dense, 2 layers) distilled from the first seed's self-distilled
model, as draft_model is. Finished runs are reused when their config is unchanged (bench/results/mtp/).

Then decodes the same held-out prompts (greedy, one request at a time, through the serving engine, eager and
compiled) plainly, with the MTP modules at each gamma up to the depth, and with the draft, and checks that every
one gives the plain tokens. Reports: the main head's held-out loss of the three arms and the seed spread; the
acceptance at each depth; tokens per target forward and tokens/s against plain decoding; the cost of one proposal
(one MTP depth, or one draft forward) relative to one target forward.

About 40 minutes on 2 cores (seven training runs of 2-5 minutes, then three compiled engines).
GPU preset: --preset moe_1b --steps 3000 with FRUGAL_DATA_DIR on a larger corpus (the depths and sizes stay).
Results: bench/results/mtp.json and bench/results/mtp.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.runtime.engine.engine import Engine, EngineConfig, EngineStats  # noqa: E402
from inference.runtime.engine.sampler import SamplingParams  # noqa: E402
from inference.runtime.generate import Generator  # noqa: E402
from model.io import md_table  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import PackedLoader, validation_rows  # noqa: E402

OUT = ROOT / "bench" / "results"
WORK = OUT / "mtp"


def run_doc(args, name: str, seed: int, model: dict, **extra) -> dict:
    """moe_model's training settings (assets.training: seq_len 128, batch 8, TrainConfig's schedule)."""
    return {
        "name": name,
        "model": model,
        "data": {"seq_len": 128, "batch_size": 8},
        "shard_dir": str(args.data_dir / "curriculum_shards"),
        "tokenizer_path": str(args.data_dir / "tokenizer" / "tokenizer.json"),
        "run_dir": str(WORK / name),
        "max_steps": args.steps,
        "warmup_steps": max(1, args.steps // 10),
        "checkpoint_every": args.steps,
        "seed": seed,
        **extra,
    }


def train(doc: dict) -> dict:
    """The run's summary.json, training it unless a finished run with the same config is there."""
    run_dir = Path(doc["run_dir"])
    saved = run_dir / "train_config.json"
    finished = (run_dir / "summary.json").exists() and saved.exists()
    if finished and TrainConfig.from_file(saved).to_dict() == TrainConfig.from_dict(doc).to_dict():
        print(f"reusing {run_dir}", flush=True)
        return json.loads((run_dir / "summary.json").read_text())
    path = WORK / f"{doc['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    print(f"training {doc['name']} ...", flush=True)
    subprocess.run([sys.executable, "-m", "training.train", "--config", str(path)], cwd=ROOT, check=True)
    return json.loads((run_dir / "summary.json").read_text())


def held_out_prompts(doc: dict, n: int, length: int) -> list[list[int]]:
    cfg = TrainConfig.from_dict(doc)
    rows = validation_rows(PackedLoader(cfg.shard_dir, load_tokenizer(cfg.tokenizer_path), cfg.data), cfg)
    flat = torch.cat(list(rows.values()))
    return [flat[i, :length].tolist() for i in range(min(n, len(flat)))]


def engine_for(target, draft, proposer: str, gamma: int, compiled: bool) -> Engine:
    """A batch-1 engine (fixed gamma, no prefix cache), compiled for up to gamma + 1 <= 8 tokens when asked."""
    config = EngineConfig(max_batch=1, proposer=proposer, gamma=gamma, adaptive_gamma=False, prefix_caching=False,
                          compile_sizes=(1, 4, 8))  # fmt: skip
    engine = Engine(target, draft, config)
    if compiled:
        torch._dynamo.reset()
        engine.compile()
    return engine


def decode(engine: Engine, gamma: int, prompts, new_tokens: int) -> dict:
    """Greedy, one request at a time, `gamma` proposals per round (0: plain steps, the proposer unused):
    tokens, tokens/s and the engine's speculation counters."""
    engine.gamma, engine.stats = gamma, EngineStats()
    outputs, seconds = [], 0.0
    for i, prompt in enumerate(prompts):
        got: list[int] = []
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        engine.add(str(i), prompt, params, lambda out, got=got: got.extend(out.token_ids))
        start = time.perf_counter()
        engine.run_until_done()
        seconds += time.perf_counter() - start
        outputs.append(got)
    s = engine.stats
    rounds = s.spec_rounds + s.plain_rounds
    return {
        "outputs": outputs,
        "tokens": s.generated_tokens,
        "tokens_per_s": s.generated_tokens / seconds,
        "tokens_per_target_forward": (s.accepted + rounds) / rounds,
        "acceptance_by_depth": [s.accepted_at[i] / s.proposed_at[i] for i in sorted(s.proposed_at)],
        "acceptance": s.accepted / s.proposed if s.proposed else None,
        "proposal_cost": (
            (s.propose_seconds / s.propose_forwards) / (s.verify_seconds / s.verify_forwards)
            if s.propose_forwards
            else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--depth", type=int, default=2, help="MTP modules of the MTP runs")
    parser.add_argument("--preset", default="small_cpu")
    parser.add_argument("--draft-preset", default="small_cpu_draft")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-gamma", type=int, default=4, help="gamma of the draft model (the package's)")
    parser.add_argument("--mtp-distill", type=float, default=0.5, help="mtp_distill_weight of the distilled arm")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the runs and stop")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FRUGAL_DATA_DIR", ROOT / "data")))
    args = parser.parse_args()
    if not (args.data_dir / "curriculum_shards" / "manifest.json").exists():
        sys.exit(f"{args.data_dir}/curriculum_shards: no shards: run `make demo` (or materialize the tokenizer) first")
    torch.set_num_threads(os.cpu_count() or 1)

    docs = {}
    for seed in args.seeds:
        docs[f"plain-s{seed}"] = run_doc(args, f"plain-s{seed}", seed, {"preset": args.preset})
        docs[f"mtp-s{seed}"] = run_doc(args, f"mtp-s{seed}", seed, {"preset": args.preset, "mtp_depth": args.depth})
        docs[f"mtpd-s{seed}"] = run_doc(args, f"mtpd-s{seed}", seed, {"preset": args.preset, "mtp_depth": args.depth},
                                        mtp_distill_weight=args.mtp_distill)  # fmt: skip
    first = f"mtpd-s{args.seeds[0]}"  # the served target: self-distilled MTP modules
    docs["draft"] = run_doc(args, "draft", args.seeds[0], {"preset": args.draft_preset, "dense_baseline": True},
                            distill_from=str(WORK / first), distill_weight=0.5)  # fmt: skip
    summaries = {name: train(doc) for name, doc in docs.items()}  # the draft last: after its teacher
    if args.train_only:
        return

    arms = {"plain": "without MTP", "mtp": f"{args.depth} MTP modules", "mtpd": f"{args.depth} MTP, self-distilled"}
    val = {arm: [summaries[f"{arm}-s{s}"]["val_loss"] for s in args.seeds] for arm in arms}
    paired = {arm: [m - p for m, p in zip(val[arm], val["plain"])] for arm in ("mtp", "mtpd")}
    seed_spread = statistics.stdev(val["plain"]) if len(args.seeds) > 1 else float("nan")

    prompts = held_out_prompts(docs[first], args.prompts, 24)
    served, undistilled = Generator.from_run(WORK / first), Generator.from_run(WORK / f"mtp-s{args.seeds[0]}")
    draft = Generator.from_run(WORK / "draft")
    rows, results = [], {}
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        print(f"decoding {len(prompts)} held-out prompts, {mode} ...", flush=True)
        runs = {}
        engine = engine_for(served, None, "mtp", args.depth, compiled)
        runs["plain"] = decode(engine, 0, prompts, args.new_tokens)
        for g in range(1, args.depth + 1):
            runs[f"mtpd-g{g}"] = decode(engine, g, prompts, args.new_tokens)
        engine = engine_for(served, draft, "draft", args.draft_gamma, compiled)
        runs["draft"] = decode(engine, args.draft_gamma, prompts, args.new_tokens)
        engine = engine_for(undistilled, None, "mtp", args.depth, compiled)
        undistilled_plain = decode(engine, 0, prompts, args.new_tokens)
        for g in range(1, args.depth + 1):
            runs[f"mtp-g{g}"] = decode(engine, g, prompts, args.new_tokens)
            runs[f"mtp-g{g}"]["identical_greedy"] = runs[f"mtp-g{g}"]["outputs"] == undistilled_plain["outputs"]
            runs[f"mtp-g{g}"]["plain_tokens_per_s"] = undistilled_plain["tokens_per_s"]
        for name, r in runs.items():
            r.setdefault("identical_greedy", r["outputs"] == runs["plain"]["outputs"])
            r.setdefault("plain_tokens_per_s", runs["plain"]["tokens_per_s"])
            assert r["identical_greedy"], f"{mode} {name}: greedy output differs from plain decoding"
        results[mode] = runs
        labels = {"plain": ("plain", 0), "draft": (f"draft ({args.draft_preset}, distilled)", args.draft_gamma)}
        for g in range(1, args.depth + 1):
            labels[f"mtpd-g{g}"] = ("MTP, self-distilled", g)
        for g in range(1, args.depth + 1):
            labels[f"mtp-g{g}"] = ("MTP, plain cross-entropy (its own target)", g)
        for name, (label, gamma) in labels.items():
            r = runs[name]
            accept = " / ".join(f"{a:.2f}" for a in r["acceptance_by_depth"]) or "-"
            cost = f"{r['proposal_cost']:.2f}" if r["proposal_cost"] is not None else "-"
            rows.append([mode, label, gamma, accept, f"{r['tokens_per_target_forward']:.2f}",
                         f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / r['plain_tokens_per_s']:.2f}x", cost,
                         "yes" if r["identical_greedy"] else "no"])  # fmt: skip
    speed_table = md_table(
        ["step", "proposer", "gamma", "acceptance by depth", "tokens / target forward", "tokens/s", "vs plain",
         "proposal / target forward", "greedy = plain"], rows,
    )  # fmt: skip
    loss_rows = [[f"seed {s}", *(f"{val[arm][i]:.4f}" for arm in arms), f"{paired['mtp'][i]:+.4f}",
                  f"{paired['mtpd'][i]:+.4f}"] for i, s in enumerate(args.seeds)]  # fmt: skip
    loss_rows.append(["mean", *(f"{statistics.mean(val[arm]):.4f}" for arm in arms),
                      f"{statistics.mean(paired['mtp']):+.4f}", f"{statistics.mean(paired['mtpd']):+.4f}"])  # fmt: skip
    loss_table = md_table(["held-out loss, main head", *arms.values(), "MTP - without", "self-distilled - without"],
                          loss_rows)  # fmt: skip
    held_out = []
    for arm in ("mtp", "mtpd"):
        s0 = summaries[f"{arm}-s{args.seeds[0]}"]
        for key in ("val_mtp_accuracy", "val_mtp_agreement"):
            values = " / ".join(f"{s0[f'{key}/depth{k}']:.3f}" for k in range(1, args.depth + 1))
            held_out.append(f"{arms[arm]}, {key.removeprefix('val_mtp_')} with the "
                            f"{'data' if key.endswith('accuracy') else 'main head'} by depth: {values}")  # fmt: skip
    compiled = results["compiled"]
    best = max((compiled[f"mtpd-g{g}"] for g in range(1, args.depth + 1)), key=lambda r: r["tokens_per_s"])
    verdicts = {
        "main-head loss no worse than without MTP, within seed noise": statistics.mean(paired["mtpd"]) <= seed_spread,
        "depth-1 acceptance >= 0.7": compiled["mtpd-g1"]["acceptance_by_depth"][0] >= 0.7,
        "a proposal costs <= 30% of a target forward": compiled["mtpd-g1"]["proposal_cost"] <= 0.30,
        "MTP speculation at least as fast as the separate draft, identical greedy output":
            best["tokens_per_s"] >= compiled["draft"]["tokens_per_s"] and best["identical_greedy"],
    }  # fmt: skip
    lines = [
        f"`python bench/mtp.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} --depth {args.depth}` "
        f"({args.preset}, {args.steps} steps of 8 x 128 tokens; {len(prompts)} held-out prompts of 24 tokens, "
        f"{args.new_tokens} new tokens each, greedy, one request at a time)",
        "",
        loss_table,
        "",
        f"Seed spread (standard deviation of the runs without MTP): {seed_spread:.4f}. Seed {args.seeds[0]}, held out:",
        "",
        *[f"- {line}" for line in held_out],
        "",
        speed_table,
        "",
        *[f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in verdicts.items()],
    ]
    report = "\n".join(lines)
    print(report)
    for mode in results.values():
        for r in mode.values():
            r.pop("outputs")
    doc = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "val_loss": val,
        "seed_spread": seed_spread,
        "held_out": held_out,
        "decode": results,
        "verdicts": verdicts,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mtp.json").write_text(json.dumps(doc, indent=2) + "\n")
    (OUT / "mtp.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
