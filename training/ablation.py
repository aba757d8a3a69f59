"""Data ablation: what curation buys in convergence and spend, measured by training the same model on
three inputs and evaluating all of them on one shared held-out set.

CLI: python -m training.ablation --config FILE (JSON or TOML, see AblationConfig; unknown keys are errors)

The three inputs (each written as a shard folder that training.data.ShardReader reads):

- (a) `raw`: clean_documents, i.e. the corpus after normalization and exact dedup only, in a seeded
  random order, one bucket;
- (b) `curated_shuffled`: the curriculum shards' documents, rows in a seeded random order, one bucket;
- (c) `curated_curriculum`: the curriculum shards' documents in curriculum order (their own buckets,
  read in the manifest's order).

Each is trained by a real `python -m training.train` process (DeepSpeed, as usual) with the same model
config, seed, learning-rate schedule and token budget; when the budget exceeds an input, the loader
starts another epoch over it (the report gives the epochs).

The held-out set. A document is held out when its id hashes into `heldout_fraction`
(training.data.is_validation, the hash training itself uses). Every such document is removed from all
three training inputs, and so are the raw near-duplicates of held-out documents (the near-dedup
clusters, when given: raw data keeps the copies near-dedup removed, and a near-copy of a test document
in the training data would flatter raw). The held-out set is the held-out documents that survived
curation. Why that is fair to raw as well: every held-out document is also a raw document (curation only
removes documents, it never rewrites them past the normalization raw already has), none of them is
trained on by any run, and they are well-formed text, the distribution a language model is wanted
for; a held-out set drawn from raw would reward modelling boilerplate, spam and duplicated text, the
things curation removes on purpose. It does favour (b) and (c) in being close to their training
distribution: that closeness is the claim under test.

Evaluation. The held-out documents are written into every input's shard folder as an extra bucket
(`HELDOUT_BUCKET`) that is not in the bucket schedule; since all of them hash into the validation
fraction and no training document does, the training loop's own validation (every `eval_every` steps,
the per-bucket loss `val_loss/bucket<HELDOUT_BUCKET>`) is exactly the loss on the shared held-out
set, on identical packed rows in all three runs. So each run's curve is held-out loss against tokens
trained, measured inside the run on the live weights, with no checkpoint juggling.

Reported:
- tokens to target: the tokens (b) and (c) need to reach (a)'s final held-out loss, interpolated
  linearly between evaluation points; a run whose curve never gets there is reported as not reached,
  never extrapolated. Device-hours and $ at that token count are interpolated the same way from the
  run's per-step spend meter. With several seeds, the curves are averaged per evaluation point first.
- the share of raw tokens curation removed (raw and curated corpora tokenized with the run's tokenizer,
  eos included, as the loader packs them), and the compute that removal saved before training: one epoch
  over the removed tokens at the raw run's measured device-seconds per token, times the price.

Budget. The default (debug_tiny with the tokenizer's vocabulary, 262,144 tokens per run) finishes the
three runs in under 15 minutes on 2 CPU cores. On a GPU, e.g.:
{"preset": "small_cpu", "tokens": 4194304, "seq_len": 256, "batch_size": 32, "eval_every_tokens": 262144}
or {"preset": "moe_1b", "tokens": 200000000, "seq_len": 1024, "batch_size": 64, "precision": "bf16",
"eval_every_tokens": 10000000} with a tokenizer of moe_1b's vocabulary.

Repeatable: the orders are seeded hashes of the ids, the held-out set a hash of the ids, training is
seeded, so the same config gives the same curves (up to float noise; use the same `threads`).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.io import atomic_file, md_table, write_text_atomic
from model.tokenizer import EOS, load_tokenizer
from pipelines.curriculum import MANIFEST_FILE, SHARD_SCHEMA, code_version, write_shard_files
from pipelines.stage import atomic_path
from training.config import PRESETS, TrainConfig, config_from_file
from training.data import ShardReader, is_validation
from training.launch import SUMMARY_FILE, train_process
from training.metrics import read_metrics

RUNS = ("raw", "curated_shuffled", "curated_curriculum")
LABELS = {
    "raw": "(a) raw, exact dedup only",
    "curated_shuffled": "(b) curated, random order",
    "curated_curriculum": "(c) curated, curriculum order",
}
HELDOUT_BUCKET = 999
"""Bucket of the shared held-out documents in every input's shards (never in a bucket schedule)."""
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLOT_FILE = "heldout_loss.png"


@dataclass(kw_only=True, slots=True)
class AblationConfig:
    """The three runs, their shared budget and the held-out set."""

    clean_documents: str = "data/clean_documents/partitions/*/documents.parquet"
    """Raw documents after cleaning and exact dedup (input (a)): a file, or a glob over the drops' files."""
    curriculum_shards: str = "data/curriculum_shards"
    """Curated shards and manifest (inputs (b) and (c))."""
    tokenizer_path: str = "data/tokenizer/tokenizer.json"
    near_duplicate_clusters: str | None = "data/near_dedup_documents/partitions/*/clusters.parquet"
    """near_dedup_documents' clusters (id, cluster_id; a file or a glob): raw near-copies of held-out documents are
    removed
    from (a) too. None = no near-dedup information (held-out documents are removed by id only)."""
    out_dir: str = "runs/data_ablation"
    """Inputs, run folders, results.json, results.md and the plot."""
    preset: str = "debug_tiny"
    """Model preset (training.config.PRESETS); vocab_size is taken from the tokenizer."""
    model: dict = field(default_factory=dict)
    """Overrides of the preset's fields, e.g. {"top_p": 0.5}."""
    tokens: int = 262_144
    """Training tokens per run (the same for all three): max_steps = tokens / (batch_size x seq_len)."""
    seq_len: int = 64
    batch_size: int = 16
    eval_every_tokens: int = 16_384
    """Held-out loss every this many training tokens (a whole number of steps)."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_tokens: int = 16_384
    seeds: list[int] = field(default_factory=lambda: [0])
    """Model seeds: each input is trained once per seed; curves are averaged over seeds."""
    data_seed: int = 0
    """Seeds the random orders of (a) and (b)."""
    heldout_fraction: float = 0.1
    """Share of documents (by a hash of the id) held out of every input."""
    heldout_tokens: int = 16_384
    """Held-out tokens evaluated (the first of the held-out documents, packed; the same rows for every run)."""
    precision: str = "fp32"
    threads: int | None = None
    """torch threads of the training process; None = every core. Keep it fixed to repeat results."""
    price_per_device_hour: float = 0.05
    """$ per device-hour (a CPU core-hour by default)."""
    wandb_project: str = "frugal"
    wandb_mode: str = "auto"
    """auto (online when WANDB_API_KEY is set, else offline), online, offline or disabled."""
    wandb_dir: str | None = None
    """Folder of the W&B runs; None = WANDB_DIR, else each run's own folder."""
    group: str | None = None
    """W&B group of the runs; None = data-ablation-<out_dir name>."""

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, not {self.preset!r}")
        step = self.batch_size * self.seq_len
        if self.tokens < step or self.tokens % step:
            raise ValueError(f"tokens={self.tokens} must be a positive multiple of batch_size x seq_len = {step}")
        if self.eval_every_tokens < step or self.eval_every_tokens % step or self.eval_every_tokens > self.tokens:
            raise ValueError(
                f"eval_every_tokens={self.eval_every_tokens} must be a multiple of batch_size x seq_len = {step} "
                f"and at most tokens={self.tokens}"
            )
        if not 0 <= self.warmup_tokens < self.tokens:
            raise ValueError(f"warmup_tokens={self.warmup_tokens} must be in [0, tokens={self.tokens})")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in (0, 0.5)")
        if self.heldout_tokens < self.seq_len + 1:
            raise ValueError(f"heldout_tokens={self.heldout_tokens} must hold at least one row of seq_len + 1")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be auto, online, offline or disabled, not {self.wandb_mode!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be a non-empty list of distinct seeds")
        for path in (self.clean_documents, self.tokenizer_path, self.near_duplicate_clusters):
            if path is not None and not glob.glob(path):
                raise ValueError(f"{path}: not found: materialize the curation assets and the tokenizer first")
        ShardReader(self.curriculum_shards)  # a missing manifest or empty shards, named
        self.train_config("raw", self.seeds[0], vocab_size=None).check()

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.seq_len)

    def train_config(self, run: str, seed: int, vocab_size: int | None) -> TrainConfig:
        """The training run of one input and seed: identical for the three inputs except the shards."""
        step = self.batch_size * self.seq_len
        model = {"preset": self.preset, **self.model}
        if vocab_size is not None:
            model.setdefault("vocab_size", vocab_size)
        name = f"{run}-seed{seed}"
        return TrainConfig.from_dict(
            {
                "name": f"ablation-{name}",
                "model": model,
                "data": {
                    "seq_len": self.seq_len,
                    "batch_size": self.batch_size,
                    "bucket_schedule": None,  # set per input by run_ablation
                    "validation_fraction": self.heldout_fraction,
                },
                "shard_dir": str(Path(self.out_dir) / "inputs" / run),
                "tokenizer_path": self.tokenizer_path,
                "run_dir": str(Path(self.out_dir) / "runs" / name),
                "max_steps": self.steps,
                "lr": self.lr,
                "min_lr": self.min_lr,
                "warmup_steps": self.warmup_tokens // step,
                "eval_every": self.eval_every_tokens // step,
                "checkpoint_every": self.steps,  # only the final one: a run is minutes long
                "keep_checkpoints": 1,
                "log_every": self.eval_every_tokens // step,
                "val_tokens_per_bucket": self.heldout_tokens,
                "precision": self.precision,
                "threads_per_rank": self.threads,
                "price_per_device_hour": self.price_per_device_hour,
                "seed": seed,
                "wandb_project": self.wandb_project,
            }
        )

    @classmethod
    def from_dict(cls, doc: dict) -> AblationConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - names)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**doc)

    @classmethod
    def from_file(cls, path: str | Path) -> AblationConfig:
        """JSON or TOML."""
        return config_from_file(cls.from_dict, path)


# -- inputs --------------------------------------------------------------------------------------------


def seeded_order(ids: list[str], seed: int) -> list[int]:
    """Positions of `ids` in a pseudo-random order fixed by the seed and the ids (not the input order)."""
    keys = [hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)


def read_files(pattern: str, columns: list[str]) -> pa.Table:
    """The rows of every Parquet file `pattern` names (a path or a glob), in file name order."""
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in sorted(glob.glob(pattern))])


def read_raw(pattern: str) -> list[dict]:
    """clean_documents rows: id, text, source."""
    return read_files(pattern, ["id", "text", "source"]).to_pylist()


def read_curated(shard_dir: str | Path) -> list[dict]:
    """The curriculum shards' rows in curriculum order (manifest bucket order, then shard row order)."""
    reader = ShardReader(shard_dir)
    columns = ["id", "text", "source", "quality_score", "bucket", "difficulty"]
    tables = [pq.read_table(Path(shard_dir) / s["path"], columns=columns) for s in reader.manifest["shards"]]
    rows = pa.concat_tables(tables).to_pylist()
    rank = {b: n for n, b in enumerate(reader.buckets())}
    return sorted(rows, key=lambda r: rank[r["bucket"]])  # stable: keeps the row order within a bucket


def excluded_ids(raw_ids: list[str], fraction: float, clusters: dict[str, int] | None) -> set[str]:
    """Ids no run trains on: every id in the held-out hash fraction, and the near-duplicate cluster
    mates of those ids (clusters: id -> cluster id, from near_dedup_documents)."""
    out = {i for i in raw_ids if is_validation(i, fraction)}
    if clusters:
        held_clusters = {clusters[i] for i in out if i in clusters}
        out |= {i for i in raw_ids if clusters.get(i) in held_clusters}
    return out


@dataclass(kw_only=True, slots=True)
class Inputs:
    """The three training inputs (rows in reading order), their bucket schedules and the held-out rows."""

    runs: dict[str, list[dict]]
    schedules: dict[str, list[int]]
    heldout: list[dict]
    n_excluded_raw: int


def split_inputs(
    raw: list[dict], curated: list[dict], fraction: float, data_seed: int, clusters: dict[str, int] | None = None
) -> Inputs:
    """(a), (b), (c) minus the held-out documents, and the shared held-out set (curated documents whose
    id hashes into the fraction, in a seeded order)."""
    excluded = excluded_ids([r["id"] for r in raw], fraction, clusters)
    excluded |= {r["id"] for r in curated if is_validation(r["id"], fraction)}
    heldout = [r for r in curated if r["id"] in excluded]
    heldout = [heldout[i] for i in seeded_order([r["id"] for r in heldout], data_seed)]
    raw_kept = [r for r in raw if r["id"] not in excluded]
    curated_kept = [r for r in curated if r["id"] not in excluded]
    curriculum = curated_kept  # already in curriculum order
    shuffled = [curated_kept[i] for i in seeded_order([r["id"] for r in curated_kept], data_seed)]
    raw_kept = [raw_kept[i] for i in seeded_order([r["id"] for r in raw_kept], data_seed)]
    buckets = list(dict.fromkeys(r["bucket"] for r in curriculum))
    return Inputs(
        runs={
            "raw": [{**r, "bucket": 0} for r in raw_kept],
            "curated_shuffled": [{**r, "bucket": 0} for r in shuffled],
            "curated_curriculum": curriculum,
        },
        schedules={"raw": [0], "curated_shuffled": [0], "curated_curriculum": buckets},
        heldout=[{**r, "bucket": HELDOUT_BUCKET} for r in heldout],
        n_excluded_raw=sum(r["id"] in excluded for r in raw),
    )


def write_shards(rows: list[dict], heldout: list[dict], out_dir: Path, target_shard_bytes: int = 32 * 2**20) -> None:
    """Rows (in reading order) then the held-out rows, as curriculum-style shards with a manifest that
    training.data.ShardReader reads. Raw documents have no quality score or difficulty: NaN."""
    all_rows = rows + heldout
    nan = float("nan")  # raw documents have no quality score or difficulty
    shard_rows = [{"quality_score": nan, "difficulty": nan, **r} for r in all_rows]
    manifest_shards = write_shard_files(shard_rows, out_dir, target_shard_bytes)
    buckets = list(dict.fromkeys(r["bucket"] for r in all_rows))
    manifest = {
        "shards": manifest_shards,
        "buckets": [{"bucket": b, "rows": sum(r["bucket"] == b for r in all_rows)} for b in buckets],
        "n_rows": len(all_rows),
        "config": {"made_by": "training.ablation", "heldout_bucket": HELDOUT_BUCKET},
        "code_version": code_version(),
        "schema": [f"{f.name}: {f.type}" for f in SHARD_SCHEMA],
    }
    tmp = atomic_path(out_dir / MANIFEST_FILE)
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST_FILE)


def count_tokens(texts: list[str], tokenizer, batch: int = 256) -> int:
    """Tokens as the loader packs them: each document's tokens plus its eos."""
    assert tokenizer.token_to_id(EOS) is not None
    return sum(
        len(e.ids) + 1 for i in range(0, len(texts), batch) for e in tokenizer.encode_batch(texts[i : i + batch])
    )


# -- analysis ------------------------------------------------------------------------------------------


def interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """ys at x, linearly between the points (xs ascending; x within their range)."""
    return float(np.interp(x, xs, ys))


def tokens_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """The tokens at which a held-out loss curve [(tokens, loss), ...] first reaches `target`: linear
    interpolation between the two evaluation points that bracket it, the first point's tokens when that
    point is already at or below it, None when no point reaches it (never extrapolated past the last)."""
    for n, (tokens, loss) in enumerate(curve):
        if loss <= target:
            if n == 0:
                return float(tokens)
            t0, l0 = curve[n - 1]
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
    return None


def heldout_curve(records: list[dict]) -> list[tuple[int, float]]:
    key = f"val_loss/bucket{HELDOUT_BUCKET}"
    return [(r["tokens"], r[key]) for r in records if key in r]


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Per evaluation point, the mean over seeds (all seeds evaluate at the same token counts)."""
    assert len({tuple(t for t, _ in c) for c in curves}) == 1, "seeds evaluated at different token counts"
    return [(t, float(np.mean([c[n][1] for c in curves]))) for n, (t, _) in enumerate(curves[0])]


def analyse(runs: dict[str, list[list[dict]]], token_counts: dict, price: float) -> dict:
    """Curves, tokens/device-hours/$ to (a)'s final loss, and the compute curation's removal saved.
    runs: input -> per seed, the run's metrics.jsonl records."""
    out: dict = {"runs": {}, "to_target": {}}
    for run, per_seed in runs.items():
        curves = [heldout_curve(records) for records in per_seed]
        device_hours = [max(r["device_hours"] for r in records) for records in per_seed]
        tokens = [records[-1]["tokens"] for records in per_seed]
        out["runs"][run] = {
            "label": LABELS[run],
            "curve": mean_curve(curves),
            "curves_per_seed": curves,
            "final_heldout_loss": mean_curve(curves)[-1][1],
            "tokens": tokens[0],
            "device_hours": float(np.mean(device_hours)),
            "spend_usd": float(np.mean(device_hours)) * price,
            "device_seconds_per_token": float(np.mean(device_hours)) * 3600 / tokens[0],
            "epochs": tokens[0] / max(1, token_counts["train_tokens"][run]),
        }
    target = out["runs"]["raw"]["final_heldout_loss"]
    raw_tokens = out["runs"]["raw"]["tokens"]
    out["target_heldout_loss"] = target
    for run in RUNS:
        reached = tokens_to_target(out["runs"][run]["curve"], target)
        entry: dict = {"reached": reached is not None, "tokens": reached}
        if reached is not None:
            hours = [
                interpolate(reached, [r["tokens"] for r in records], [r["device_hours"] for r in records])
                for records in runs[run]
            ]
            entry |= {
                "share_of_raw_tokens": reached / raw_tokens,
                "device_hours": float(np.mean(hours)),
                "spend_usd": float(np.mean(hours)) * price,
            }
        out["to_target"][run] = entry
    curriculum = out["to_target"]["curated_curriculum"]
    out["target_met"] = bool(curriculum["reached"] and curriculum["share_of_raw_tokens"] <= 0.7)
    removed = token_counts["raw_corpus"] - token_counts["curated_corpus"]
    seconds = removed * out["runs"]["raw"]["device_seconds_per_token"]
    out["curation"] = {
        "raw_corpus_tokens": token_counts["raw_corpus"],
        "curated_corpus_tokens": token_counts["curated_corpus"],
        "removed_tokens": removed,
        "removed_share": removed / token_counts["raw_corpus"],
        "epoch_device_hours_saved": seconds / 3600,
        "epoch_usd_saved": seconds / 3600 * price,
    }
    return out


def table_rows(results: dict) -> list[tuple]:
    rows = []
    for run in RUNS:
        r, t = results["runs"][run], results["to_target"][run]
        rows.append(
            (
                r["label"],
                f"{results['token_counts']['train_tokens'][run]:,}",
                f"{r['epochs']:.2f}",
                f"{r['final_heldout_loss']:.4f}",
                f"{t['tokens']:,.0f}" if t["reached"] else "not reached",
                f"{t['share_of_raw_tokens']:.0%}" if t["reached"] else "not reached",
                f"{t['device_hours']:.4f}" if t["reached"] else "-",
                f"{t['spend_usd']:.5f}" if t["reached"] else "-",
            )
        )
    return rows


TABLE_COLUMNS = (
    "input",
    "training tokens available",
    "epochs",
    "final held-out loss",
    "tokens to (a)'s final loss",
    "share of (a)'s tokens",
    "device-hours to it",
    "$ to it",
)


def markdown(results: dict) -> str:
    lines = [md_table(TABLE_COLUMNS, table_rows(results))]
    c, h = results["curation"], results["heldout"]
    lines += [
        "",
        f"Target: (a)'s final held-out loss {results['target_heldout_loss']:.4f}; (c) within 70% of (a)'s tokens: "
        f"{'met' if results['target_met'] else 'not met'}.",
        f"Curation removed {c['removed_share']:.1%} of the raw tokens ({c['raw_corpus_tokens']:,} -> "
        f"{c['curated_corpus_tokens']:,}); one epoch over the removed tokens would cost "
        f"{c['epoch_device_hours_saved']:.4f} device-hours (${c['epoch_usd_saved']:.5f}) at the raw run's speed.",
        f"Held-out set: {h['documents']} documents, {h['tokens_evaluated']:,} tokens evaluated; "
        f"{h['raw_documents_excluded']} raw documents kept out of training.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    for run, color in zip(RUNS, ("#c44e52", "#4c72b0", "#55a868")):
        r = results["runs"][run]
        for curve in r["curves_per_seed"] if len(r["curves_per_seed"]) > 1 else []:
            ax.plot([t for t, _ in curve], [v for _, v in curve], color=color, alpha=0.25, lw=0.8)
        ax.plot([t for t, _ in r["curve"]], [v for _, v in r["curve"]], "o-", color=color, ms=3, label=r["label"])
    ax.axhline(results["target_heldout_loss"], color="gray", ls="--", lw=0.8, label="(a) final")
    ax.set(xlabel="training tokens", ylabel="held-out loss (nats/token)", title="data ablation: shared held-out set")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return png


# -- running -------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, env: dict[str, str]) -> list[dict]:
    """One real training process (training.launch.train_process); its metrics."""
    train_process(cfg, env)
    return read_metrics(Path(cfg.run_dir))


def run_ablation(config: AblationConfig, progress: Callable[[str], None] = print) -> dict:
    """Build the inputs, train the three runs (per seed), analyse, write results.json, results.md and
    the plot, and log a summary W&B run in the ablation's group. Returns the results."""
    config.check()
    started = time.monotonic()
    out = Path(config.out_dir)
    group = config.group or f"data-ablation-{out.resolve().name}"
    tokenizer = load_tokenizer(config.tokenizer_path)
    clusters = None
    if config.near_duplicate_clusters is not None:
        table = read_files(config.near_duplicate_clusters, ["id", "cluster_id"])
        clusters = dict(zip(table["id"].to_pylist(), table["cluster_id"].to_pylist()))
    raw, curated = read_raw(config.clean_documents), read_curated(config.curriculum_shards)
    inputs = split_inputs(raw, curated, config.heldout_fraction, config.data_seed, clusters)
    for run in RUNS:
        write_shards(inputs.runs[run], inputs.heldout, out / "inputs" / run)
    token_counts = {
        "raw_corpus": count_tokens([r["text"] for r in raw], tokenizer),
        "curated_corpus": count_tokens([r["text"] for r in curated], tokenizer),
        "train_tokens": {run: count_tokens([r["text"] for r in inputs.runs[run]], tokenizer) for run in RUNS},
        "heldout": count_tokens([r["text"] for r in inputs.heldout], tokenizer),
    }
    progress(
        f"inputs: raw {len(inputs.runs['raw']):,} docs ({token_counts['train_tokens']['raw']:,} tokens), curated "
        f"{len(inputs.runs['curated_curriculum']):,} docs ({token_counts['train_tokens']['curated_curriculum']:,} "
        f"tokens), held-out {len(inputs.heldout):,} docs ({token_counts['heldout']:,} tokens); "
        f"{config.tokens:,} training tokens per run"
    )
    mode = config.wandb_mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    env = {"WANDB_RUN_GROUP": group, "WANDB_PROJECT": config.wandb_project, "WANDB_MODE": mode}
    if config.wandb_dir is not None:
        env["WANDB_DIR"] = str(Path(config.wandb_dir).resolve())
    records: dict[str, list[list[dict]]] = {run: [] for run in RUNS}
    run_dirs, wandb_runs = {}, {}
    n, total = 0, len(RUNS) * len(config.seeds)
    for seed in config.seeds:
        for run in RUNS:
            n += 1
            cfg = config.train_config(run, seed, tokenizer.get_vocab_size())
            cfg.data.bucket_schedule = inputs.schedules[run]
            t0 = time.monotonic()
            recs = train(cfg, env)
            records[run].append(recs)
            curve = heldout_curve(recs)
            summary = json.loads((Path(cfg.run_dir) / SUMMARY_FILE).read_text())
            run_dirs[cfg.name], wandb_runs[cfg.name] = cfg.run_dir, summary.get("wandb_run")
            progress(
                f"run {n}/{total} {LABELS[run]} seed {seed}: held-out loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f} "
                f"over {recs[-1]['tokens']:,} tokens in {time.monotonic() - t0:.0f}s (${recs[-1]['spend_usd']:.5f})"
            )
    results = analyse(records, token_counts, config.price_per_device_hour)
    heldout_rows = (config.heldout_tokens // (config.seq_len + 1)) * config.seq_len
    results |= {
        "config": dataclasses.asdict(config),
        "token_counts": token_counts,
        "heldout": {
            "documents": len(inputs.heldout),
            "tokens": token_counts["heldout"],
            "tokens_evaluated": min(heldout_rows, token_counts["heldout"]),
            "raw_documents_excluded": inputs.n_excluded_raw,
        },
        "run_dirs": run_dirs,
        "wandb_group": group,
        "wandb_runs": wandb_runs,
        "seconds": time.monotonic() - started,
    }
    png = plot(results, out / PLOT_FILE)
    write_text_atomic(out / TABLE_FILE, markdown(results))
    results["wandb_runs"]["summary"] = log_summary_run(results, png, group, env)
    tmp = atomic_path(out / RESULTS_FILE)
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / RESULTS_FILE)
    progress(f"done in {results['seconds']:.0f}s: {out / RESULTS_FILE}, {out / TABLE_FILE}, {png}")
    return results


def log_summary_run(results: dict, png: Path, group: str, env: dict[str, str]) -> str | None:
    """The table and the plot as one more W&B run in the ablation's group (env: the W&B settings the
    training runs got)."""
    if env["WANDB_MODE"] == "disabled":
        return None
    import wandb

    run = wandb.init(
        project=env["WANDB_PROJECT"], group=group, job_type="ablation", name=f"{group}-summary", mode=env["WANDB_MODE"],
        dir=env.get("WANDB_DIR") or os.environ.get("WANDB_DIR") or str(png.parent), config=results["config"],
        reinit="create_new",
        settings=wandb.Settings(silent=True, console="off"),
    )  # fmt: skip
    try:
        run.log(
            {
                "ablation/table": wandb.Table(columns=list(TABLE_COLUMNS), data=[list(r) for r in table_rows(results)]),
                "ablation/heldout_loss": wandb.Image(str(png)),
            }
        )
        summary = {f"to_target/{k}/tokens": v["tokens"] for k, v in results["to_target"].items()}
        summary |= {f"curation/{k}": v for k, v in results["curation"].items()}
        run.summary.update({**summary, "target_met": results["target_met"]})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="ablation config (JSON or TOML, see AblationConfig)")
    args = parser.parse_args(argv)
    try:
        config = AblationConfig.from_file(args.config)
        config.check()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_ablation(config, progress=lambda line: print(line, flush=True))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
