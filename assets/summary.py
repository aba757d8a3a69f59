"""What `make demo` prints at the end: each materialized stage, where its outputs are, the ledger.

python -m assets.summary [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

from assets.ledger import CURATION_STAGES
from pipelines.stage import STATS_FILE, StageStats

MODELS = ("moe_model", "dense_baseline_model", "draft_model")


def summary(data_dir: Path) -> str:
    lines = [f"Frugal outputs under {data_dir.resolve()}", ""]
    lines.append(f"{'stage':<24}{'in':>9}{'kept':>9}{'dropped':>9}{'seconds':>9}  drop reasons")
    total_dropped, stages = 0, []
    for stage in CURATION_STAGES:
        if not (data_dir / stage / STATS_FILE).exists():
            continue
        s = StageStats.load(data_dir / stage)
        stages.append(s)
        total_dropped += s.n_dropped
        grouped = Counter()  # heuristic:gopher_quality.gopher_short_doc counts as heuristic:gopher_quality
        for reason, count in s.drop_reasons.items():
            grouped[reason.split(".", 1)[0]] += count
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(grouped.items())) or "-"
        lines.append(f"{stage:<24}{s.n_in:>9}{s.n_kept:>9}{s.n_dropped:>9}{s.seconds:>9.1f}  {reasons}")
    if stages:
        balanced = stages[0].n_in == stages[-1].n_kept + total_dropped
        lines += [
            "",
            f"ledger: {stages[0].n_in} input documents = {stages[-1].n_kept} kept + {total_dropped} dropped"
            f" ({'balanced' if balanced else 'NOT BALANCED'}): {data_dir / 'document_ledger' / 'ledger.parquet'}",
        ]
    models = [name for name in MODELS if (data_dir / name / "summary.json").exists()]
    if models:
        lines += ["", f"{'model':<24}{'params':>12}{'active':>12}{'tokens':>10}{'val loss':>10}{'tok/s':>8}{'$':>9}"]
        for name in models:
            s = json.loads((data_dir / name / "summary.json").read_text())
            lines.append(
                f"{name:<24}{s['total_params']:>12,}{s['active_params']:>12,}{s['tokens']:>10,}"
                f"{s['val_loss']:>10.3f}{s['tokens_per_s'] or 0:>8,.0f}{s['spend_usd']:>9.4f}"
            )
    report = data_dir / "quantized_model" / "report.json"
    if report.exists():
        lines += [
            "",
            f"{'quantized moe_model':<24}{'weights':>20}{'KV cache':>18}{'val ppl':>10}{'vs fp32':>9}{'MiB':>7}",
        ]
        for r in json.loads(report.read_text())["rows"]:
            lines.append(
                f"{r['label']:<24}{r['weights']:>20}{r['kv_cache']:>18}{r['perplexity']:>10.3f}"
                f"{r['delta_pct']:>+8.2f}%{r['weight_bytes'] / 2**20:>7.2f}"
            )
    lines += [
        "",
        "Each stage folder holds documents.parquet, ledger.parquet and stats.json;",
        "near_dedup_documents also clusters.parquet and cluster_sizes.png; scored_documents scores.parquet and",
        "score plots; curriculum_shards holds shard-*.parquet and manifest.json (the input of training);",
        "quality_classifier holds model.bin, config.json and metrics.json; each model folder holds",
        "model.safetensors, config.json, tokenizer.json, metrics.jsonl, loss_curve.png and checkpoints/;",
        "quantized_model holds int8/ and int4/ {target,draft} folders that Generator.from_run loads.",
        "Open the Dagster UI with `make ui`, then http://127.0.0.1:3000 (runs, metadata, checks).",
        "W&B runs (offline unless WANDB_API_KEY is set) are under ./wandb: `wandb sync wandb/offline-run-*`.",
    ]
    return "\n".join(lines)


def step_times() -> str:
    """Wall time of each step of the newest Dagster run (DAGSTER_HOME's), slowest first: where the demo's minutes
    go. Empty without an instance or a run."""
    if not os.environ.get("DAGSTER_HOME"):
        return ""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(limit=1)
        if not runs:
            return ""
        run = runs[0]
        stats = [s for s in instance.get_run_step_stats(run.run_id) if s.start_time and s.end_time]
        record = instance.get_run_record_by_id(run.run_id)
    if not stats:
        return ""
    total = (record.end_time or stats[-1].end_time) - (record.start_time or stats[0].start_time)
    lines = [f"run {run.run_id[:8]} ({run.status.value}): {total / 60:.1f} minutes; its slowest steps (seconds):"]
    for s in sorted(stats, key=lambda s: s.start_time - s.end_time)[:12]:
        lines.append(f"  {s.step_key:<58}{s.end_time - s.start_time:>8.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FRUGAL_DATA_DIR", "data"))
    print(summary(Path(parser.parse_args().data_dir)))
    times = step_times()
    if times:
        print(f"\n{times}")


if __name__ == "__main__":
    main()
