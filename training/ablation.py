"""Data ablation: what curation and the data schedule buy in convergence and spend, measured by training the same
model with the same tokens and seeds on every arm and evaluating all of them on one shared held-out set.

CLI: python -m training.ablation --config FILE (JSON or TOML, see AblationConfig; unknown keys are errors)

Two inputs (each written as a shard folder that training.data.ShardReader reads):
- `raw`: clean_documents, i.e. the corpus after normalization and exact dedup only, in a seeded random order, one
  bucket;
- `curated`: the curriculum shards' documents with their buckets (quality tier x difficulty tier, in the shards'
  curriculum order) and the buckets' quality tiers.

Five arms (ISSUE_ARMS, the default), each a real `python -m training.train` process (DeepSpeed, as usual) per seed:
- (a) `raw`: raw, cosine learning rate;
- (b) `curated_cosine`: curated in random order (a mixture of every bucket by the documents it has left: a uniformly
  random order), cosine;
- (c) `curated_wsd`: the same order, warmup-stable-decay (training.config: constant, then a decay over the last
  `decay_fraction`);
- (d) `curated_wsd_anneal`: WSD, and during the decay only the top quality tier ("quality anneal", as Llama 3, OLMo 2
  and MiniCPM end their runs). Its stable phase reads exactly the documents (c) reads;
- (e) `curated_easy_to_hard`: curated in the shards' curriculum order (bucket by bucket; easy_to_hard by default),
  cosine;
- (f) `raw_wsd`, optional (`arms`): raw with WSD, which tells how much of a WSD arm's gain over (a) the schedule alone
  gives and how much curation adds at the same schedule.
The model config, seed, warmup, peak and final learning rate and token budget are the same for all; only the input,
the order and the learning-rate shape differ. When the budget exceeds an input the loader reads it again; the report
gives each arm's most reads of any document (1 = every document at most once), measured by replaying its stream.

The held-out set. A document is held out when its id hashes into `heldout_fraction` (training.data.is_validation, the
hash training itself uses). Every such document is removed from both inputs, and so are the raw near-duplicates of
held-out documents (the near-dedup clusters, when given: raw data keeps the copies near-dedup removed, and a
near-copy of a test document in the training data would flatter raw). The held-out set is the held-out documents
that survived curation. Why that is fair to raw as well: every held-out document is also a raw document (curation
only removes documents, it never rewrites them past the normalization raw already has), none of them is trained on
by any run, and they are well-formed text, the distribution a language model is wanted for; a held-out set drawn
from raw would reward modelling boilerplate, spam and duplicated text, the things curation removes on purpose. It
does favour the curated arms in being close to their training distribution: that closeness is the claim under test.

Evaluation. The held-out documents are written into each input's shard folder as an extra bucket (`HELDOUT_BUCKET`)
that no arm reads for training (all of them hash into the validation fraction, no training document does), so the
training loop's own validation (every `eval_every` steps, the per-bucket loss `val_loss/bucket<HELDOUT_BUCKET>`) is
exactly the loss on the shared held-out set, on identical packed rows in every run: each run's curve is held-out
loss against tokens trained, measured inside the run on the live weights.

Reported:
- tokens to target: the tokens an arm needs to reach (a)'s final held-out loss, interpolated linearly between
  evaluation points; a curve that never gets there is "not reached", never extrapolated. Per seed against that
  seed's (a), and on the curves averaged over seeds. Device-hours and $ at that token count are interpolated the
  same way from the run's spend meter.
- paired comparisons: per seed, the difference in tokens to target (as a share of (a)'s tokens) between two arms
  trained on that seed, their mean and spread (the sample standard deviation over seeds). The best curated arm is
  the one with the fewest mean tokens to target; it "beats" (b) when its mean paired difference is below zero by
  more than the spread.
- the share of raw tokens curation removed (both corpora tokenized with the run's tokenizer, eos included, as the
  loader packs them), and the compute that removal saved before training: one epoch over the removed tokens at the
  raw run's measured device-seconds per token, times the price.

Budget. The default (debug_tiny with the tokenizer's vocabulary, 262,144 tokens per run, one seed) takes about 7
minutes on 2 CPU cores on the demo's data. `make bench-ablation` (bench/ablation.py) runs the issue-20 scale: a
24,000-document sample corpus curated by the pipeline, three seeds, 524,288 tokens per run. On a GPU, e.g.:
{"preset": "small_cpu", "tokens": 8388608, "seq_len": 256, "batch_size": 32, "eval_every_tokens": 524288,
"seeds": [0, 1, 2]} on a 100,000-document sample (bench/ablation.py --n-documents 100000), or {"preset": "moe_1b",
"tokens": 200000000, "seq_len": 1024, "batch_size": 64, "precision": "bf16", "eval_every_tokens": 10000000} with a
tokenizer of moe_1b's vocabulary and a corpus of several billion tokens.

Repeatable: the orders are seeded hashes of the ids, the mixture's draws a seeded hash of the document's position,
the held-out set a hash of the ids, training is seeded, so the same config gives the same curves (up to float noise;
use the same `threads`).
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
from training.config import CONFIG_FILE, DECAY_SHAPES, PRESETS, TrainConfig, config_from_file
from training.data import PackedLoader, ShardReader, is_validation
from training.launch import SUMMARY_FILE, train_process
from training.metrics import read_metrics


@dataclass(frozen=True, slots=True)
class Arm:
    """One arm of the ablation: its input, learning-rate shape and data order."""

    label: str
    input: str
    """raw or curated."""
    lr_schedule: str
    """training.config.LR_SCHEDULES."""
    order: str
    """random (raw: a seeded order; curated: a mixture of every bucket), anneal (random, then the top quality tier
    during the decay) or curriculum (bucket by bucket, in the shards' order)."""


ARMS = {
    "raw": Arm("(a) raw, exact dedup only; cosine", "raw", "cosine", "random"),
    "curated_cosine": Arm("(b) curated, random order; cosine", "curated", "cosine", "random"),
    "curated_wsd": Arm("(c) curated, random order; WSD", "curated", "wsd", "random"),
    "curated_wsd_anneal": Arm("(d) curated, WSD + quality anneal", "curated", "wsd", "anneal"),
    "curated_easy_to_hard": Arm("(e) curated, curriculum order; cosine", "curated", "cosine", "curriculum"),
    "raw_wsd": Arm("(f) raw, exact dedup only; WSD", "raw", "wsd", "random"),
}
ISSUE_ARMS = ("raw", "curated_cosine", "curated_wsd", "curated_wsd_anneal", "curated_easy_to_hard")
"""The default arms. (f) raw_wsd is optional: it tells how much of a WSD arm's gain the schedule alone gives."""
BASELINE = "curated_cosine"
"""The curated arm the others are compared with, seed by seed."""
INPUTS = ("raw", "curated")
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
    """Curated shards and manifest (the curated arms' input)."""
    tokenizer_path: str = "data/tokenizer/tokenizer.json"
    near_duplicate_clusters: str | None = "data/near_dedup_documents/partitions/*/clusters.parquet"
    """near_dedup_documents' clusters (id, cluster_id; a file or a glob): raw near-copies of held-out documents are
    removed
    from (a) too. None = no near-dedup information (held-out documents are removed by id only)."""
    out_dir: str = "runs/data_ablation"
    """Inputs, run folders, results.json, results.md and the plot."""
    arms: list[str] = field(default_factory=lambda: list(ISSUE_ARMS))
    """The arms trained (ARMS; "raw" is always one: its final loss is the target)."""
    preset: str = "debug_tiny"
    """Model preset (training.config.PRESETS); vocab_size is taken from the tokenizer."""
    model: dict = field(default_factory=dict)
    """Overrides of the preset's fields, e.g. {"top_p": 0.5}."""
    tokens: int = 262_144
    """Training tokens per run (the same for every arm): max_steps = tokens / (batch_size x seq_len)."""
    seq_len: int = 64
    batch_size: int = 16
    eval_every_tokens: int = 16_384
    """Held-out loss every this many training tokens (a whole number of steps)."""
    budgets: list[float] = field(default_factory=list)
    """Shorter budgets, as fractions of `tokens`, at which every arm is also trained as a run of its own (its whole
    learning-rate schedule and mixture fitted to that budget), e.g. [0.25, 0.5]: the tokens an arm's recipe needs to
    reach the target when the run is planned that short, which is how a WSD run is used (decay when needed). [] = none.
    Each budget x tokens must be a whole number of evaluations."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_tokens: int = 16_384
    decay_fraction: float = 0.2
    """WSD arms: the share of the run the decay (and the quality anneal) takes."""
    decay_shape: str = "1-sqrt"
    """WSD arms: linear or 1-sqrt."""
    anneal_tiers: list[int] = field(default_factory=lambda: [-1])
    """The quality tiers the anneal reads during the decay (-1 = the top tier)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Model seeds: each arm is trained once per seed; comparisons are paired by seed."""
    data_seed: int = 0
    """Seeds the random order of the raw input and the curated mixture's draws (the same for every model seed)."""
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
        for b in self.budgets:
            budget = b * self.tokens
            if (
                not 0 < b < 1
                or budget != int(budget)
                or budget % self.eval_every_tokens
                or budget <= self.warmup_tokens
            ):
                raise ValueError(
                    f"budgets: {b} must be in (0, 1), and {b} x tokens a multiple of eval_every_tokens="
                    f"{self.eval_every_tokens} above warmup_tokens={self.warmup_tokens}"
                )
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets={self.budgets} repeats a budget")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in (0, 0.5)")
        if self.heldout_tokens < self.seq_len + 1:
            raise ValueError(f"heldout_tokens={self.heldout_tokens} must hold at least one row of seq_len + 1")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be auto, online, offline or disabled, not {self.wandb_mode!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be a non-empty list of distinct seeds")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or "raw" not in self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms={self.arms} must be distinct arms of {list(ARMS)}, raw among them (the target)")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, not {self.decay_shape!r}")
        if isinstance(self.decay_fraction, bool) or not 0 < self.decay_fraction < 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} must be in (0, 1)")
        for path in (self.clean_documents, self.tokenizer_path, self.near_duplicate_clusters):
            if path is not None and not glob.glob(path):
                raise ValueError(f"{path}: not found: materialize the curation assets and the tokenizer first")
        ShardReader(self.curriculum_shards)  # a missing manifest or empty shards, named
        for arm in self.arms:
            self.train_config(arm, self.seeds[0], vocab_size=None, buckets=[0]).check()

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.seq_len)

    def train_config(
        self, run: str, seed: int, vocab_size: int | None, buckets: list[int], budget: float = 1.0
    ) -> TrainConfig:
        """The training run of one arm and seed: identical for every arm but the input, the order and the learning
        rate's shape (buckets: the input's training buckets, in reading order; budget: a fraction of `tokens`, the
        whole schedule fitted to it)."""
        step = self.batch_size * self.seq_len
        arm = ARMS[run]
        model = {"preset": self.preset, **self.model}
        if vocab_size is not None:
            model.setdefault("vocab_size", vocab_size)
        steps = round(self.tokens * budget) // step
        name = f"{run}-seed{seed}" if budget == 1.0 else f"{run}-{budget:g}x-seed{seed}"
        data: dict = {"bucket_schedule": buckets}  # raw, and the curriculum order
        if arm.input == "curated" and arm.order == "random":
            data = {"mix_schedule": [{"until": 1.0}]}
        elif arm.order == "anneal":  # the stable phase as (c), then the top tier from the decay's first step on
            stable = (steps - max(1, round(self.decay_fraction * steps))) / steps
            data = {"mix_schedule": [{"until": stable}, {"until": 1.0, "quality_tiers": self.anneal_tiers}]}
        return TrainConfig.from_dict(
            {
                "name": f"ablation-{name}",
                "model": model,
                "data": {
                    "seq_len": self.seq_len,
                    "batch_size": self.batch_size,
                    "validation_fraction": self.heldout_fraction,
                    "mix_seed": self.data_seed,
                    **data,
                },
                "lr_schedule": arm.lr_schedule,
                "decay_fraction": self.decay_fraction,
                "decay_shape": self.decay_shape,
                "shard_dir": str(Path(self.out_dir) / "inputs" / arm.input),
                "tokenizer_path": self.tokenizer_path,
                "run_dir": str(Path(self.out_dir) / "runs" / name),
                "max_steps": steps,
                "lr": self.lr,
                "min_lr": self.min_lr,
                "warmup_steps": self.warmup_tokens // step,
                "eval_every": self.eval_every_tokens // step,
                "checkpoint_every": steps,  # only the final one: a run is minutes long
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
    """The two training inputs (rows in reading order), their buckets and the held-out rows."""

    runs: dict[str, list[dict]]
    """raw and curated."""
    schedules: dict[str, list[int]]
    heldout: list[dict]
    n_excluded_raw: int


def split_inputs(
    raw: list[dict], curated: list[dict], fraction: float, data_seed: int, clusters: dict[str, int] | None = None
) -> Inputs:
    """Raw (a seeded order, one bucket) and curated (curriculum order, its buckets) minus the held-out documents, and
    the shared held-out set (curated documents whose id hashes into the fraction, in a seeded order)."""
    excluded = excluded_ids([r["id"] for r in raw], fraction, clusters)
    excluded |= {r["id"] for r in curated if is_validation(r["id"], fraction)}
    heldout = [r for r in curated if r["id"] in excluded]
    heldout = [heldout[i] for i in seeded_order([r["id"] for r in heldout], data_seed)]
    raw_kept = [r for r in raw if r["id"] not in excluded]
    curriculum = [r for r in curated if r["id"] not in excluded]  # already in curriculum order
    raw_kept = [raw_kept[i] for i in seeded_order([r["id"] for r in raw_kept], data_seed)]
    return Inputs(
        runs={"raw": [{**r, "bucket": 0} for r in raw_kept], "curated": curriculum},
        schedules={"raw": [0], "curated": list(dict.fromkeys(r["bucket"] for r in curriculum))},
        heldout=[{**r, "bucket": HELDOUT_BUCKET} for r in heldout],
        n_excluded_raw=sum(r["id"] in excluded for r in raw),
    )


def write_shards(
    rows: list[dict],
    heldout: list[dict],
    out_dir: Path,
    target_shard_bytes: int = 32 * 2**20,
    bucket_info: dict[int, dict] | None = None,
) -> None:
    """Rows (in reading order) then the held-out rows, as curriculum-style shards with a manifest that
    training.data.ShardReader reads. Raw documents have no quality score or difficulty: NaN. bucket_info: the source
    manifest's entries per bucket (their quality and difficulty tiers go into this manifest)."""
    all_rows = rows + heldout
    nan = float("nan")  # raw documents have no quality score or difficulty
    shard_rows = [{"quality_score": nan, "difficulty": nan, **r} for r in all_rows]
    manifest_shards = write_shard_files(shard_rows, out_dir, target_shard_bytes)
    buckets = list(dict.fromkeys(r["bucket"] for r in all_rows))
    info = bucket_info or {}
    tiers = ("quality_tier", "difficulty_tier")
    manifest = {
        "shards": manifest_shards,
        "buckets": [
            {"bucket": b, "rows": sum(r["bucket"] == b for r in all_rows)}
            | {k: info[b][k] for k in tiers if k in info.get(b, {})}
            for b in buckets
        ],
        "n_rows": len(all_rows),
        "config": {"made_by": "training.ablation", "heldout_bucket": HELDOUT_BUCKET},
        "code_version": code_version(),
        "schema": [f"{f.name}: {f.type}" for f in SHARD_SCHEMA],
    }
    tmp = atomic_path(out_dir / MANIFEST_FILE)
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST_FILE)


def most_reads(cfg: TrainConfig, tokenizer) -> int:
    """The most times the run's stream reads any one document in cfg.max_steps batches (1 = each at most once),
    found by replaying it: the loader is deterministic, so this is what training read."""
    loader = PackedLoader(cfg.shard_dir, tokenizer, cfg.data, total_steps=cfg.max_steps)
    batches = iter(loader)
    for _ in range(cfg.max_steps):
        batch = next(batches, None)
        if batch is None:  # end of an ordered pass: the trainer starts the next one
            batches = iter(loader)
            next(batches)
    if loader.mixtures is not None:
        return max(-(-loader.consumed[b] // n) for b, n in loader.counts.items() if n and loader.consumed[b])
    return loader.epoch + (loader.docs_consumed > 0)


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


def paired(a: list[float | None], b: list[float | None]) -> dict:
    """Per seed a - b, their mean and spread (sample standard deviation; None with one seed); None where either is."""
    diffs = [x - y if x is not None and y is not None else None for x, y in zip(a, b)]
    known = [d for d in diffs if d is not None]
    complete = len(known) == len(diffs) and bool(known)
    return {
        "per_seed": diffs,
        "mean": float(np.mean(known)) if complete else None,
        "spread": float(np.std(known, ddof=1)) if complete and len(known) > 1 else None,
        "min": min(known) if complete else None,
        "max": max(known) if complete else None,
    }


def _mean_sd(values: list[float | None]) -> tuple[float | None, float]:
    """Mean and sample standard deviation (0 with one value); (None, 0) when any value is missing."""
    if not values or None in values:
        return None, 0.0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def budget_tokens_to_target(points: list[tuple[float, float]], target: float) -> tuple[float | None, bool]:
    """Tokens at which runs planned for different budgets [(tokens, final loss), ...] (ascending tokens) first end at
    or below `target`, linear between budgets; and whether it is only an upper bound (the smallest budget already
    does, so fewer tokens might too: never extrapolated below it)."""
    reached = tokens_to_target(points, target)
    return reached, reached is not None and points[0][1] <= target


def analyse(
    runs: dict[str, list[list[dict]]],
    token_counts: dict,
    price: float,
    arms: dict | None = None,
    budget_runs: dict[str, dict[float, list[list[dict]]]] | None = None,
) -> dict:
    """Curves, tokens/device-hours/$ to (a)'s final loss (on the seed-mean curves and seed by seed), paired
    differences against (b) and (a), the best curated arm and the targets, and the compute curation's removal saved.
    runs: arm -> per seed (the same seeds, in the same order, for every arm), the run's metrics.jsonl records;
    budget_runs: arm -> budget (a fraction of the tokens) -> per seed, the records of the run planned that short.

    Each arm's tokens to target, per seed, is the fewer of two readings: where its curve first reaches the target
    (stopping the run there), and, with budget_runs, the shortest planned run whose final loss reaches it."""
    arms = arms or ARMS
    budget_runs = budget_runs or {}
    out: dict = {"runs": {}, "to_target": {}, "paired": {}, "budgets": {}}
    for run, per_seed in runs.items():
        curves = [heldout_curve(records) for records in per_seed]
        device_hours = [max(r["device_hours"] for r in records) for records in per_seed]
        tokens = [records[-1]["tokens"] for records in per_seed]
        finals = [c[-1][1] for c in curves]
        out["runs"][run] = {
            "label": arms[run].label,
            "lr_schedule": arms[run].lr_schedule,
            "order": arms[run].order,
            "curve": mean_curve(curves),
            "curves_per_seed": curves,
            "final_heldout_loss": mean_curve(curves)[-1][1],
            "final_heldout_loss_per_seed": finals,
            "final_heldout_loss_spread": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
            "lr": [(r["tokens"], r["lr"]) for r in per_seed[0] if "lr" in r],
            "tokens": tokens[0],
            "device_hours": float(np.mean(device_hours)),
            "spend_usd": float(np.mean(device_hours)) * price,
            "device_seconds_per_token": float(np.mean(device_hours)) * 3600 / tokens[0],
            "epochs": tokens[0] / max(1, token_counts["train_tokens"][arms[run].input]),
        }
    raw = out["runs"]["raw"]
    target, raw_tokens = raw["final_heldout_loss"], raw["tokens"]
    out["target_heldout_loss"] = target
    out["target_heldout_loss_per_seed"] = raw["final_heldout_loss_per_seed"]
    for run in runs:
        reached = tokens_to_target(out["runs"][run]["curve"], target)
        per_seed = [
            tokens_to_target(c, t)
            for c, t in zip(out["runs"][run]["curves_per_seed"], raw["final_heldout_loss_per_seed"])
        ]
        curve_shares = [t / raw_tokens if t is not None else None for t in per_seed]
        shares = list(curve_shares)
        if budget_runs.get(run):
            fractions = sorted(budget_runs[run])
            finals = [  # per seed, the final held-out loss at each budget and of the whole run
                [heldout_curve(budget_runs[run][b][n])[-1][1] for b in fractions]
                + [out["runs"][run]["final_heldout_loss_per_seed"][n]]
                for n in range(len(per_seed))
            ]
            budget_tokens = [f * raw_tokens for f in fractions] + [raw_tokens]
            crossings = [
                budget_tokens_to_target(list(zip(budget_tokens, f)), t)
                for f, t in zip(finals, raw["final_heldout_loss_per_seed"])
            ]
            budget_shares = [t / raw_tokens if t is not None else None for t, _ in crossings]
            out["budgets"][run] = {
                "fractions": [*fractions, 1.0],
                "final_per_seed": finals,
                "share_per_seed": budget_shares,
                "upper_bound_per_seed": [bound for _, bound in crossings],
                "share_mean": _mean_sd(budget_shares)[0],
            }
            shares = [min((x for x in pair if x is not None), default=None) for pair in zip(shares, budget_shares)]
        mean, sd = _mean_sd(shares)
        entry: dict = {
            "reached": reached is not None,
            "tokens": reached,
            "tokens_per_seed": per_seed,
            "curve_share_per_seed": curve_shares,
            "curve_share_mean": _mean_sd(curve_shares)[0],
            "share_per_seed": shares,
            "share_mean": mean,
            "share_spread": sd,
        }
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
    curated = [run for run in runs if arms[run].input == "curated"]
    for run in runs:  # every arm against raw; the curated ones against (b), and the WSD ones against raw with WSD
        if run == "raw":
            continue
        shares = out["to_target"][run]["share_per_seed"]
        others = ["raw"]
        if arms[run].input == "curated" and run != BASELINE:
            others.append(BASELINE)
        if arms[run].input == "curated" and arms[run].lr_schedule == "wsd":
            others.append("raw_wsd")
        out["paired"][run] = {
            f"vs_{o}": paired(shares, out["to_target"][o]["share_per_seed"]) for o in others if o in runs
        }

    def rank(run: str) -> tuple:  # reached on every seed first, then the fewest tokens
        t = out["to_target"][run]
        return (t["share_mean"] is None, t["share_mean"] or 0.0, t["tokens"] is None, t["tokens"] or 0.0)

    best = min(curated, key=rank) if curated else None
    out["best"] = best
    targets: dict = {}
    if best is not None:
        t = out["to_target"][best]
        targets["half_the_raw_tokens"] = bool(t["share_mean"] is not None and t["share_mean"] <= 0.5)
        vs = out["paired"][best].get("vs_" + BASELINE)
        targets["beats_random_cosine"] = bool(  # a spread needs two seeds or more
            vs is not None and vs["spread"] is not None and vs["mean"] < 0 and -vs["mean"] > vs["spread"]
        )
    out["targets"] = targets
    out["target_met"] = bool(targets) and all(targets.values())
    removed = token_counts["raw_corpus"] - token_counts["curated_corpus"]
    seconds = removed * raw["device_seconds_per_token"]
    out["curation"] = {
        "raw_corpus_tokens": token_counts["raw_corpus"],
        "curated_corpus_tokens": token_counts["curated_corpus"],
        "removed_tokens": removed,
        "removed_share": removed / token_counts["raw_corpus"],
        "epoch_device_hours_saved": seconds / 3600,
        "epoch_usd_saved": seconds / 3600 * price,
    }
    return out


def _share(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "not reached"


def _pm(mean: float | None, spread: float, fmt: str = "{:.0%}") -> str:
    if mean is None:
        return "not reached"
    return fmt.format(mean) + (f" ± {fmt.format(spread)}" if spread else "")


def table_rows(results: dict) -> list[tuple]:
    rows = []
    for run, r in results["runs"].items():
        t = results["to_target"][run]
        b = results.get("budgets", {}).get(run)
        rows.append(
            (
                r["label"],
                f"{results['token_counts']['train_tokens'][ARMS[run].input]:,}",
                str(results.get("most_reads", {}).get(run, "-")),
                _pm(r["final_heldout_loss"], r["final_heldout_loss_spread"], "{:.4f}"),
                f"{t['tokens']:,.0f}" if t["reached"] else "not reached",
                _share(t.get("share_of_raw_tokens")),
                _pm(*_mean_sd(t["curve_share_per_seed"])),
                (("≤ " if b and any(b["upper_bound_per_seed"]) else "") + _share(b["share_mean"])) if b else "-",
                _pm(t["share_mean"], t["share_spread"]),
                f"{t['device_hours']:.4f}" if t["reached"] else "-",
                f"{t['spend_usd']:.5f}" if t["reached"] else "-",
            )
        )
    return rows


TABLE_COLUMNS = (
    "arm",
    "training tokens available",
    "most reads of a document",
    "final held-out loss (mean ± sd over seeds)",
    "tokens to (a)'s final loss (mean curve)",
    "share of (a)'s tokens (mean curve)",
    "share, curve per seed (mean ± sd)",
    "share, shortest planned run (mean)",
    "share, fewer of the two (mean ± sd)",
    "device-hours to it (curve)",
    "$ to it (curve)",
)
BUDGET_COLUMNS = ("arm", "budget (share of the tokens)", "final held-out loss (mean ± sd)", "reaches (a)'s final")


def budget_rows(results: dict) -> list[tuple]:
    rows = []
    targets = results["target_heldout_loss_per_seed"]
    for run, b in results.get("budgets", {}).items():
        for n, fraction in enumerate(b["fractions"]):
            finals = [f[n] for f in b["final_per_seed"]]
            hits = sum(f <= t for f, t in zip(finals, targets))
            rows.append(
                (
                    _letter(results, run),
                    f"{fraction:.0%}",
                    _pm(*_mean_sd(finals), "{:.4f}"),
                    f"{hits}/{len(finals)} seeds",
                )
            )
    return rows


PAIRED_COLUMNS = ("comparison", "per seed", "mean", "spread (sd)")


def _letter(results: dict, run: str) -> str:
    """An arm's letter, as its label gives it: "(b)"."""
    return results["runs"][run]["label"].split(" ")[0]


def paired_rows(results: dict) -> list[tuple]:
    rows = []
    for run, comparisons in results["paired"].items():
        for key, p in comparisons.items():
            other = key.removeprefix("vs_")
            per_seed = ", ".join(f"{d:+.0%}" if d is not None else "not reached" for d in p["per_seed"])
            rows.append(
                (
                    f"{_letter(results, run)} - {_letter(results, other)}",
                    per_seed,
                    f"{p['mean']:+.1%}" if p["mean"] is not None else "-",
                    f"{p['spread']:.1%}" if p["spread"] is not None else "-",
                )
            )
    return rows


def markdown(results: dict) -> str:
    lines = [md_table(TABLE_COLUMNS, table_rows(results))]
    if results.get("budgets"):
        lines += ["", "Runs planned for shorter budgets (each its whole schedule fitted to the budget):", "",
                  md_table(BUDGET_COLUMNS, budget_rows(results))]  # fmt: skip
    if results["paired"]:
        lines += ["", "Paired by seed: the difference in tokens to that seed's (a) final loss (the fewer of the two "
                  "readings), as a share of (a)'s tokens (negative = fewer tokens).", "",
                  md_table(PAIRED_COLUMNS, paired_rows(results))]  # fmt: skip
    c, h = results["curation"], results["heldout"]
    best, targets = results["best"], results["targets"]
    if best is not None:
        share = results["to_target"][best]["share_mean"]
        lines += [
            "",
            f"Best curated arm: {results['runs'][best]['label']} ({_share(share)} of (a)'s tokens, mean over seeds). "
            f"Within 50% of (a)'s tokens: {'met' if targets['half_the_raw_tokens'] else 'not met'}; beats (b) by more "
            f"than the paired seed spread: {'met' if targets['beats_random_cosine'] else 'not met'}.",
        ]
    lines += [
        f"Target: (a)'s final held-out loss {results['target_heldout_loss']:.4f} (the mean over "
        f"{len(results['config']['seeds'])} seed(s)).",
        f"Curation removed {c['removed_share']:.1%} of the raw tokens ({c['raw_corpus_tokens']:,} -> "
        f"{c['curated_corpus_tokens']:,}); one epoch over the removed tokens would cost "
        f"{c['epoch_device_hours_saved']:.4f} device-hours (${c['epoch_usd_saved']:.5f}) at the raw run's speed.",
        f"Held-out set: {h['documents']} documents, {h['tokens_evaluated']:,} tokens evaluated; "
        f"{h['raw_documents_excluded']} raw documents kept out of training.",
    ]
    return "\n".join(lines) + "\n"


COLORS = {"raw": "#c44e52", "curated_cosine": "#4c72b0", "curated_wsd": "#8172b2", "curated_wsd_anneal": "#55a868",
          "curated_easy_to_hard": "#dd8452", "raw_wsd": "#937860"}  # fmt: skip


def plot(results: dict, png: Path) -> Path:
    """Held-out loss against tokens per arm (seeds faint, their mean bold), and the learning rates beside it."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100, gridspec_kw={"width_ratios": [2.2, 1]})
    for run, r in results["runs"].items():
        color = COLORS[run]
        for curve in r["curves_per_seed"] if len(r["curves_per_seed"]) > 1 else []:
            ax.plot([t for t, _ in curve], [v for _, v in curve], color=color, alpha=0.25, lw=0.8)
        ax.plot([t for t, _ in r["curve"]], [v for _, v in r["curve"]], "o-", color=color, ms=3, label=r["label"])
        if r["lr"] and run in ("raw", "curated_wsd"):  # one cosine and one WSD: the others share them
            lr_ax.plot([t for t, _ in r["lr"]], [v for _, v in r["lr"]], color=color, label=r["lr_schedule"])
    ax.axhline(results["target_heldout_loss"], color="gray", ls="--", lw=0.8, label="(a) final")
    ax.set(xlabel="training tokens", ylabel="held-out loss (nats/token)", title="data ablation: shared held-out set")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    lr_ax.set(xlabel="training tokens", ylabel="learning rate", title="learning rate")
    for a in (ax, lr_ax):
        a.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))  # 100k, 1M
    lr_ax.legend(fontsize=7)
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return png


# -- running -------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, env: dict[str, str]) -> tuple[list[dict], bool]:
    """One real training process (training.launch.train_process); its metrics, and whether a finished run of the same
    config was found in its folder and reused instead (an interrupted ablation, run again, trains only what is
    missing)."""
    run_dir = Path(cfg.run_dir)
    saved = run_dir / CONFIG_FILE
    if (run_dir / SUMMARY_FILE).exists() and saved.exists() and json.loads(saved.read_text()) == cfg.to_dict():
        return read_metrics(run_dir), True
    train_process(cfg, env)
    return read_metrics(run_dir), False


def run_ablation(config: AblationConfig, progress: Callable[[str], None] = print) -> dict:
    """Build the inputs, train every arm (per seed), analyse, write results.json, results.md and the plot, and log a
    summary W&B run in the ablation's group. Returns the results."""
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
    source = ShardReader(config.curriculum_shards).manifest
    bucket_info = {b["bucket"]: b for b in source["buckets"]}
    for name in INPUTS:
        info = bucket_info if name == "curated" else None
        write_shards(inputs.runs[name], inputs.heldout, out / "inputs" / name, bucket_info=info)
    token_counts = {
        "raw_corpus": count_tokens([r["text"] for r in raw], tokenizer),
        "curated_corpus": count_tokens([r["text"] for r in curated], tokenizer),
        "train_tokens": {name: count_tokens([r["text"] for r in inputs.runs[name]], tokenizer) for name in INPUTS},
        "heldout": count_tokens([r["text"] for r in inputs.heldout], tokenizer),
    }
    progress(
        f"inputs: raw {len(inputs.runs['raw']):,} docs ({token_counts['train_tokens']['raw']:,} tokens), curated "
        f"{len(inputs.runs['curated']):,} docs ({token_counts['train_tokens']['curated']:,} tokens), held-out "
        f"{len(inputs.heldout):,} docs ({token_counts['heldout']:,} tokens); {config.tokens:,} training tokens per run"
    )
    mode = config.wandb_mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    env = {"WANDB_RUN_GROUP": group, "WANDB_PROJECT": config.wandb_project, "WANDB_MODE": mode}
    if config.wandb_dir is not None:
        env["WANDB_DIR"] = str(Path(config.wandb_dir).resolve())
    vocab = tokenizer.get_vocab_size()
    reads = {
        run: most_reads(config.train_config(run, config.seeds[0], vocab, inputs.schedules[ARMS[run].input]), tokenizer)
        for run in config.arms
    }
    records: dict[str, list[list[dict]]] = {run: [] for run in config.arms}
    budget_records: dict[str, dict[float, list[list[dict]]]] = {
        run: {b: [] for b in config.budgets} for run in config.arms
    }
    run_dirs, wandb_runs = {}, {}
    n, total = 0, len(config.arms) * len(config.seeds) * (1 + len(config.budgets))
    for seed in config.seeds:
        for budget in (1.0, *config.budgets):  # the whole runs first: a partial ablation still answers the issue
            for run in config.arms:
                n += 1
                cfg = config.train_config(run, seed, vocab, inputs.schedules[ARMS[run].input], budget)
                t0 = time.monotonic()
                recs, reused = train(cfg, env)
                (records[run] if budget == 1.0 else budget_records[run][budget]).append(recs)
                curve = heldout_curve(recs)
                summary = json.loads((Path(cfg.run_dir) / SUMMARY_FILE).read_text())
                run_dirs[cfg.name], wandb_runs[cfg.name] = cfg.run_dir, summary.get("wandb_run")
                progress(
                    f"run {n}/{total} {ARMS[run].label}{'' if budget == 1.0 else f' at {budget:g}x'} seed {seed}: "
                    f"held-out loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f} over {recs[-1]['tokens']:,} tokens "
                    + ("(a finished run of this config, reused)" if reused else f"in {time.monotonic() - t0:.0f}s")
                    + f" (${recs[-1]['spend_usd']:.5f})"
                )
    results = analyse(records, token_counts, config.price_per_device_hour, budget_runs=budget_records)
    heldout_rows = (config.heldout_tokens // (config.seq_len + 1)) * config.seq_len
    results |= {
        "config": dataclasses.asdict(config),
        "token_counts": token_counts,
        "most_reads": reads,
        "curriculum_order": source.get("config", {}).get("order"),
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
    """The tables and the plot as one more W&B run in the ablation's group (env: the W&B settings the training runs
    got)."""
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
                "ablation/paired": wandb.Table(
                    columns=list(PAIRED_COLUMNS), data=[list(r) for r in paired_rows(results)]
                ),
                "ablation/budgets": wandb.Table(
                    columns=list(BUDGET_COLUMNS), data=[list(r) for r in budget_rows(results)]
                ),
                "ablation/heldout_loss": wandb.Image(str(png)),
            }
        )
        summary = {f"to_target/{k}/tokens": v["tokens"] for k, v in results["to_target"].items()}
        summary |= {f"to_target/{k}/share_mean": v["share_mean"] for k, v in results["to_target"].items()}
        summary |= {f"curation/{k}": v for k, v in results["curation"].items()}
        summary |= {f"target/{k}": v for k, v in results["targets"].items()}
        run.summary.update({**summary, "best": results["best"], "target_met": results["target_met"]})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def run_from_cli(make_config: Callable[[], AblationConfig]) -> int:
    """A command line's ablation: the config made and checked (an error is printed, exit status 2), then run with its
    progress printed, then its tables."""
    try:
        config = make_config()
        config.check()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_ablation(config, progress=lambda line: print(line, flush=True))
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="ablation config (JSON or TOML, see AblationConfig)")
    args = parser.parse_args(argv)
    return run_from_cli(lambda: AblationConfig.from_file(args.config))


if __name__ == "__main__":
    sys.exit(main())
