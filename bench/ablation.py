"""The data-schedule ablation at a scale where order can matter (issue 20): `make bench-ablation`.

    .venv/bin/python bench/ablation.py [--n-documents 24000] [--tokens 524288] [--seeds 0 1 2]

1. Data. The sample corpus at `--n-documents` (the sample builder's default mix of real documentation, near and
   exact duplicates and web junk) goes through the project's own curation graph: `dagster asset materialize
   --select '*tokenizer'` into `--data-dir` (its own FRUGAL_DATA_DIR and DAGSTER_HOME, so the demo's data is not
   touched). 24,000 documents give about 6,900 curated ones (1.7M tokens with the 8,192-token tokenizer trained on
   them). Built once; a stamp file names the size.
2. The ablation (training.ablation): the issue's five arms (raw; curated random order with cosine; with WSD; WSD
   with a quality anneal; curriculum order with cosine) and (f) raw with WSD, which separates what the schedule
   gives from what curation gives. Each is trained once per seed with the same model, tokens, warmup and peak and
   final learning rates, and evaluated on one shared held-out set. The default budget (524,288 tokens per run) reads
   each curated document at most once in every curated arm, the anneal's top tier included; the report's "most
   reads" column shows it. Every arm is also trained as runs planned for a quarter and half of the tokens (`--budgets`:
   the whole schedule fitted to the shorter budget, the way a WSD run is decayed when it is needed), so an arm's
   tokens to target is the fewer of stopping its long run and planning a shorter one. Run again, it reuses the
   finished runs of the same config (training.ablation.train).

Time on 2 CPU cores: about 2 minutes for the data, then about a minute per whole run (debug_tiny, 512 steps of 1,024
tokens, held-out loss every 32,768 tokens) and 20-35 s per shorter one: 18 whole and 36 shorter runs, about 40
minutes in all.

On a GPU: --preset small_cpu --n-documents 100000 --tokens 8388608 --seq-len 256 --batch-size 32
--eval-every-tokens 524288 (a 4x larger model and 16x the tokens; the corpus is large enough that the curated arms
still read each document at most once).

Results: `--out`/results.json, results.md (the tables BENCHMARKS.md records) and heldout_loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.ablation import ARMS, AblationConfig, run_from_cli  # noqa: E402

BIN = Path(sys.executable).parent


def build_data(data_dir: Path, n_documents: int) -> float:
    """The curation graph over an n-document sample corpus, into data_dir; seconds taken (0 when already built)."""
    stamp = data_dir / f".built-{n_documents}"
    if stamp.exists():
        return 0.0
    if data_dir.exists():
        shutil.rmtree(data_dir)
    home = data_dir / ".dagster"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "FRUGAL_DATA_DIR": str(data_dir), "WANDB_MODE": "offline",
           "WANDB_DIR": str(data_dir)}  # fmt: skip
    started = time.monotonic()
    subprocess.run([str(BIN / "python"), "-m", "assets.drops", "add", "sample"], cwd=ROOT, env=env, check=True)
    run_config = {"ops": {"raw_documents": {"config": {"sample_documents": n_documents}}}}
    print(f"curating a {n_documents:,}-document sample corpus into {data_dir} ...", flush=True)
    proc = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "assets.definitions", "--select", "*tokenizer",
         "--partition", "sample", "--config-json", json.dumps(run_config)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode:
        sys.exit(f"curation failed:\n{proc.stderr[-4000:]}")
    stamp.write_text(f"{n_documents}\n")
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-documents", type=int, default=24_000)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "bench" / "results" / "ablation_data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ablation")
    parser.add_argument("--preset", default="debug_tiny")
    parser.add_argument("--tokens", type=int, default=524_288)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every-tokens", type=int, default=32_768)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--decay-fraction", type=float, default=0.2)
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5],
                        help="shorter budgets (fractions of --tokens) every arm is also planned for")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads per training (default: every core)")
    args = parser.parse_args(argv)

    seconds = build_data(args.data_dir, args.n_documents)
    if seconds:
        print(f"curated in {seconds:.0f}s", flush=True)
    data = args.data_dir
    return run_from_cli(
        lambda: AblationConfig(
            clean_documents=str(data / "clean_documents" / "partitions" / "*" / "documents.parquet"),
            curriculum_shards=str(data / "curriculum_shards"),
            tokenizer_path=str(data / "tokenizer" / "tokenizer.json"),
            near_duplicate_clusters=str(data / "near_dedup_documents" / "partitions" / "*" / "clusters.parquet"),
            out_dir=str(args.out),
            arms=args.arms,
            preset=args.preset,
            tokens=args.tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            eval_every_tokens=args.eval_every_tokens,
            warmup_tokens=args.eval_every_tokens // 2,
            decay_fraction=args.decay_fraction,
            budgets=args.budgets,
            seeds=args.seeds,
            threads=args.threads,
            wandb_mode=os.environ.get("WANDB_MODE", "offline"),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
