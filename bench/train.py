"""Training benchmark: the DeepSpeed engine against a plain-torch loop, MoE against the dense baseline,
top-p dynamic routing against fixed top-k, and expert balance with and without bias balancing.

Usage: python bench/train.py [--steps 400] [--data-dir data]   (or `make bench-train`)

Everything is trained on the curriculum shards and tokenizer that `make demo` builds (FRUGAL_DATA_DIR),
with the small_cpu preset, the same seed and the same tokens, in one run on this machine; each
DeepSpeed run is a real `python -m training.train` process. Results: bench/results/train.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.moe_deepspeed import deepspeed_transformer, load_reference_state  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import PackedLoader  # noqa: E402
from training.metrics import read_metrics  # noqa: E402

OUT = ROOT / "bench" / "results"


def run_config(data_dir: Path, name: str, steps: int, model: dict) -> dict:
    return {
        "name": name,
        "model": {"preset": "small_cpu", **model},
        "data": {"seq_len": 128, "batch_size": 8},
        "shard_dir": str(data_dir / "curriculum_shards"),
        "tokenizer_path": str(data_dir / "tokenizer" / "tokenizer.json"),
        "run_dir": str(OUT / "train" / name),
        "max_steps": steps,
        "warmup_steps": max(1, steps // 10),
        "eval_every": max(1, steps // 6),
        "checkpoint_every": steps,
        "log_every": max(1, steps // 6),
    }


def train(doc: dict) -> list[dict]:
    path = OUT / "train" / f"{doc['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    print(f"training {doc['name']} ...", flush=True)
    subprocess.run([sys.executable, "-m", "training.train", "--config", str(path)], cwd=ROOT, check=True)
    return read_metrics(Path(doc["run_dir"]))


def steady(records: list[dict], key: str, skip: int = 10) -> float:
    """Median over the steps after the first `skip` (which include warm-up and allocation)."""
    return statistics.median(r[key] for r in records[skip:] if key in r)


def tail_mean(records: list[dict], key: str, last: int = 50) -> float:
    values = [r[key] for r in records if key in r][-last:]
    return sum(values) / len(values)


def plain_torch_tokens_per_s(cfg: TrainConfig, steps: int, deepspeed_layer: bool) -> float:
    """The same model, optimizer, clipping and balancing in a plain torch loop (no DeepSpeed engine)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    if deepspeed_layer:
        reference, model = model, deepspeed_transformer(cfg.model)
        load_reference_state(model, reference.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    loader = PackedLoader(cfg.shard_dir, load_tokenizer(cfg.tokenizer_path), cfg.data, total_steps=cfg.max_steps)
    batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
    rates = []
    for step in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        for layer in model.moe_layers():
            layer.update_bias(layer.last_routing.load_E(cfg.model.n_routed_experts))
        rates.append(batch[:, 1:].numel() / (time.perf_counter() - start))
    return statistics.median(rates[10:])


def table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--speed-steps", type=int, default=60, help="steps of the plain-torch timing loops")
    parser.add_argument("--top-p", type=float, default=0.53, help="p of the dynamic-routing run (k_max = top_k)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FRUGAL_DATA_DIR", ROOT / "data")))
    args = parser.parse_args()
    if not (args.data_dir / "curriculum_shards" / "manifest.json").exists():
        sys.exit(f"{args.data_dir}/curriculum_shards: no shards: run `make demo` (or materialize the tokenizer) first")
    torch.set_num_threads(os.cpu_count() or 1)

    variants = {
        "moe_top2_balanced": {},
        "moe_top2_unbalanced": {"bias_update_rate": 0.0},
        "moe_top_p": {"top_p": args.top_p},
        "dense_baseline": {"dense_baseline": True},
    }
    docs = {name: run_config(args.data_dir, name, args.steps, model) for name, model in variants.items()}
    metrics = {name: train(doc) for name, doc in docs.items()}
    summaries = {name: json.loads((OUT / "train" / name / "summary.json").read_text()) for name in docs}

    base_cfg = TrainConfig.from_dict(docs["moe_top2_balanced"])
    print("timing the plain-torch loops ...", flush=True)
    plain_ds_layer = plain_torch_tokens_per_s(base_cfg, args.speed_steps, deepspeed_layer=True)
    plain_reference = plain_torch_tokens_per_s(base_cfg, args.speed_steps, deepspeed_layer=False)
    engine = steady(metrics["moe_top2_balanced"], "tokens_per_s")

    k = base_cfg.model.top_k
    val = {name: summaries[name]["val_loss"] for name in docs}
    active = {name: tail_mean(metrics[name], "active_experts_per_token") for name in docs if "dense" not in name}
    moe_runs = [name for name in docs if "dense" not in name]
    load = {name: tail_mean(metrics[name], "expert_load_max_over_mean") for name in moe_runs}
    window = {name: metrics[name][-1]["expert_load_max_over_mean_window"] for name in moe_runs}
    val_load = {name: summaries[name]["val_expert_load_max_over_mean"] for name in moe_runs}
    dense_cfg = TrainConfig.from_dict(docs["dense_baseline"]).model
    results = {
        "steps": args.steps,
        "tokens": summaries["moe_top2_balanced"]["tokens"],
        "speed": {
            "deepspeed_engine": engine,
            "plain_torch_same_layer": plain_ds_layer,
            "plain_torch_reference_moe": plain_reference,
            "ratio": engine / plain_ds_layer,
        },
        "val_loss": val,
        "active_experts_per_token": active,
        "expert_load_max_over_mean": {"per_step_mean_last50": load, "window50": window, "validation": val_load},
        "params": {
            "moe_total": base_cfg.model.total_params(),
            "moe_active": base_cfg.model.active_params(),
            "dense_active": dense_cfg.active_params(),
        },
        "spend_usd": {name: summaries[name]["spend_usd"] for name in docs},
    }
    (OUT / "train.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nsmall_cpu, {args.steps} steps x 8 x 128 tokens = {results['tokens']:,} tokens per run, 1 rank\n")
    print(
        table(
            ["loop", "tokens/s", "vs plain (same layer)"],
            [
                ["DeepSpeed engine (ZeRO-1, DeepSpeed MoE layer)", f"{engine:,.0f}", f"{engine / plain_ds_layer:.2f}x"],
                ["plain torch, DeepSpeed MoE layer", f"{plain_ds_layer:,.0f}", "1.00x"],
                ["plain torch, reference MoE (expert loop)", f"{plain_reference:,.0f}", "-"],
            ],
        )
    )
    print()
    rows = []
    for name in docs:
        rows.append(
            [
                name,
                f"{val[name]:.4f}",
                f"{active.get(name, float('nan')):.2f}",
                f"{load.get(name, float('nan')):.2f}",
                f"{window.get(name, float('nan')):.2f}",
                f"{val_load.get(name, float('nan')):.2f}",
                f"{steady(metrics[name], 'tokens_per_s'):,.0f}",
                f"{summaries[name]['spend_usd']:.4f}",
            ]
        )
    print(
        table(
            [
                "run",
                "val loss",
                "experts/token (last 50 steps)",
                "load max/mean: per step (last 50)",
                "over the last 50 steps",
                "over the validation set",
                "tokens/s",
                "spend $",
            ],
            rows,
        )
    )
    print(
        f"\nactive params/token: MoE {base_cfg.model.active_params():,} "
        f"(of {base_cfg.model.total_params():,}), dense {dense_cfg.active_params():,}"
    )
    checks = [
        ("DeepSpeed >= 0.9x plain torch", engine >= 0.9 * plain_ds_layer),
        ("MoE val loss < dense", val["moe_top2_balanced"] < val["dense_baseline"]),
        (f"top-p experts/token <= 0.8k = {0.8 * k}", active["moe_top_p"] <= 0.8 * k),
        ("top-p val loss within 1% of top-k", val["moe_top_p"] <= 1.01 * val["moe_top2_balanced"]),
        ("balanced load max/mean over the last 50 steps <= 1.2", window["moe_top2_balanced"] <= 1.2),
    ]
    print("\n" + "\n".join(f"{'PASS' if ok else 'MISS'}  {what}" for what, ok in checks))
    print(f"\nresults: {OUT / 'train.json'}")


if __name__ == "__main__":
    main()
