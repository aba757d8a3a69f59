"""Training data from the curriculum shards: documents tokenized, joined with eos and packed into
fixed-length sequences, in curriculum order, deterministic and resumable.

The stream is read one of two ways:
- in order: the bucket schedule says which buckets are read and in what order (default: the manifest's order,
  bucket 0 first), one pass over them per epoch;
- as a mixture (`DataConfig.mix_schedule`): each document comes from a bucket drawn at random by the weights of the
  phase of the run it starts in (its first token's batch over the run's steps), then the next document of that
  bucket. A phase without weights draws each bucket in proportion to the documents it has left, which reads its
  buckets' documents in a uniformly random order and repeats none before all are read. The draw of document n is a
  hash of (mix_seed, n), so the stream depends on nothing but the config and the shards.

A held-out share of each bucket (chosen by a hash of the document id, so it never changes) is kept out of training
and serves the per-bucket validation loss.

Resuming: `state_dict()` records the documents consumed (per bucket for a mixture), the batches yielded and the
tokens left over in the packing buffer; a loader given that state continues with exactly the batches an
uninterrupted one would have produced.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from model.config import ModelConfig
from model.tokenizer import EOS
from pipelines.curriculum import MANIFEST_FILE
from training.config import CONFIG_FILE, DataConfig, TrainConfig


def is_validation(doc_id: str, fraction: float) -> bool:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=4).digest(), "big") < fraction * 2**32


def check_compatible(tokenizer, config: ModelConfig) -> None:
    """The tokenizer's ids must fit the model's embedding: a clear error before anything is launched."""
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model config says vocab_size="
            f"{config.vocab_size}: train the tokenizer with that size or change the config"
        )


class ShardReader:
    """Documents of the curriculum shards, by bucket, in the order they were written."""

    def __init__(self, shard_dir: str | Path):
        self.shard_dir = Path(shard_dir)
        manifest_path = self.shard_dir / MANIFEST_FILE
        if not manifest_path.exists():
            raise ValueError(f"{manifest_path}: no manifest: materialize curriculum_shards first")
        self.manifest = json.loads(manifest_path.read_text())
        missing = [s["path"] for s in self.manifest["shards"] if not (self.shard_dir / s["path"]).exists()]
        if missing:
            raise ValueError(f"{self.shard_dir}: shards listed in the manifest are missing: {', '.join(missing)}")
        if not self.manifest["shards"] or self.manifest["n_rows"] == 0:
            raise ValueError(f"{self.shard_dir}: the shards hold no documents")

    def buckets(self) -> list[int]:
        return [b["bucket"] for b in self.manifest["buckets"]]

    def quality_tiers(self) -> dict[int, int]:
        """Bucket -> its quality tier, for the buckets whose manifest entry has one (curriculum_shards' do)."""
        return {b["bucket"]: b["quality_tier"] for b in self.manifest["buckets"] if b.get("quality_tier") is not None}

    def training_counts(self, fraction: float) -> dict[int, int]:
        """Documents per bucket that are not held out (every bucket of the manifest, 0 included)."""
        counts = dict.fromkeys(self.buckets(), 0)
        for shard in self.manifest["shards"]:
            table = pq.read_table(self.shard_dir / shard["path"], columns=["id", "bucket"])
            for doc_id, bucket in zip(table["id"].to_pylist(), table["bucket"].to_pylist()):
                if not is_validation(doc_id, fraction):
                    counts[bucket] = counts.get(bucket, 0) + 1
        return counts

    def documents(self, bucket: int) -> Iterator[tuple[str, str]]:
        """(id, text) of a bucket's documents, shard by shard."""
        for shard in self.manifest["shards"]:
            if str(bucket) not in shard["bucket_counts"]:
                continue
            table = pq.read_table(self.shard_dir / shard["path"], columns=["id", "text", "bucket"])
            table = table.filter(pc.equal(table["bucket"], bucket))
            yield from zip(table["id"].to_pylist(), table["text"].to_pylist())


@dataclass(frozen=True, slots=True)
class Mixture:
    """A mix_schedule phase resolved against the shards: the buckets it draws from and how."""

    until: float
    buckets: tuple[int, ...]
    weights: tuple[float, ...] | None
    """Fixed weights per bucket; None = in proportion to the documents each has left in the current round."""


def check_mixture(config: DataConfig, reader: ShardReader, counts: dict[int, int] | None = None) -> list[Mixture]:
    """The mix_schedule's phases against the shards' manifest: a ValueError naming the field for a bucket or quality
    tier the manifest lacks, or a phase with no training documents to draw."""
    config.check()
    assert config.mix_schedule is not None
    known = reader.buckets()
    counts = counts if counts is not None else reader.training_counts(config.validation_fraction)
    tiers = reader.quality_tiers()
    out = []
    for n, phase in enumerate(config.mix_schedule):
        where = f"data.mix_schedule[{n}]"
        weights = None
        if phase.weights is not None:
            unknown = sorted(set(phase.weights) - set(known))
            if unknown:
                raise ValueError(f"{where}.weights names bucket(s) {unknown}; the shards' manifest has {known}")
            empty = sorted(b for b, w in phase.weights.items() if w > 0 and counts[b] == 0)
            if empty:
                raise ValueError(f"{where}.weights: bucket(s) {empty} hold no training documents (all held out)")
            buckets = tuple(b for b in known if phase.weights.get(b, 0) > 0)
            weights = tuple(float(phase.weights[b]) for b in buckets)
        elif phase.quality_tiers is not None:
            if not tiers:
                raise ValueError(f"{where}.quality_tiers: the shards' manifest gives no bucket a quality_tier")
            top = max(tiers.values())
            wanted = set()
            for t in phase.quality_tiers:
                tier = t if t >= 0 else top + 1 + t
                if tier not in set(tiers.values()):
                    raise ValueError(f"{where}.quality_tiers names tier {t}; the manifest's tiers are 0..{top}")
                wanted.add(tier)
            buckets = tuple(b for b in known if tiers.get(b) in wanted)
        else:
            buckets = tuple(known)
        if not sum(counts[b] for b in buckets):
            raise ValueError(f"{where}: its buckets {list(buckets)} hold no training documents")
        out.append(Mixture(phase.until, buckets, weights))
    return out


def _unit(seed: int, n: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, n)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest(), "big") / 2**64


def draw_bucket(mixture: Mixture, consumed: dict[int, int], counts: dict[int, int], u: float) -> int:
    """The bucket of the next document: by the fixed weights, or in proportion to the documents each bucket has
    left in the current round (a round ends when every one of the phase's buckets has been read through)."""
    buckets = [b for b in mixture.buckets if counts[b]]
    if mixture.weights is not None:
        weights = [w for b, w in zip(mixture.buckets, mixture.weights) if counts[b]]
    else:
        rounds = max(1, max(-(-consumed[b] // counts[b]) for b in buckets))
        weights = [rounds * counts[b] - consumed[b] for b in buckets]
        if not sum(weights):  # every bucket read through this round: the next round starts
            weights = [(rounds + 1) * counts[b] - consumed[b] for b in buckets]
    target, total = u * sum(weights), 0.0
    for b, w in zip(buckets, weights):
        total += w
        if target < total:
            return b
    return buckets[-1]


class PackedLoader:
    """Batches (batch_size, seq_len + 1) of int64 token ids: one pass over the bucket schedule per epoch, or an
    endless mixture by phase (then `total_steps`, the run's steps, places the phases)."""

    def __init__(self, shard_dir: str | Path, tokenizer, config: DataConfig, total_steps: int | None = None):
        self.reader = ShardReader(shard_dir)
        self.tokenizer = tokenizer
        self.config = config
        self.eos = tokenizer.token_to_id(EOS)
        if self.eos is None:
            raise ValueError(f"the tokenizer has no {EOS} token")
        self.mixtures: list[Mixture] | None = None
        if config.mix_schedule is not None:
            self.counts = self.reader.training_counts(config.validation_fraction)
            self.mixtures = check_mixture(config, self.reader, self.counts)
            self.schedule = sorted({b for m in self.mixtures for b in m.buckets})
        else:
            schedule = config.bucket_schedule if config.bucket_schedule is not None else self.reader.buckets()
            unknown = sorted(set(schedule) - set(self.reader.buckets()))
            if unknown:
                raise ValueError(f"bucket_schedule names buckets {unknown}; the shards have {self.reader.buckets()}")
            self.schedule = list(schedule)
        self.total_steps = total_steps
        self.docs_consumed = 0
        self.epoch = 0
        self.batches = 0
        self.buffer: list[int] = []
        self.consumed = dict.fromkeys(self.reader.buckets(), 0)
        """Mixture: documents read per bucket, over all rounds."""
        self.drawn: Counter = Counter()
        """Documents begun per bucket since take_mixture() last emptied it."""

    def _training_texts(self) -> Iterator[tuple[int, str]]:
        """(bucket, text) in schedule order."""
        for bucket in self.schedule:
            for doc_id, text in self.reader.documents(bucket):
                if not is_validation(doc_id, self.config.validation_fraction):
                    yield bucket, text

    def validation_texts(self) -> dict[int, list[str]]:
        """Held-out documents of each bucket."""
        out: dict[int, list[str]] = {}
        for bucket in self.reader.buckets():
            out[bucket] = [
                t for i, t in self.reader.documents(bucket) if is_validation(i, self.config.validation_fraction)
            ]
        return out

    def state_dict(self) -> dict:
        state = {
            "docs_consumed": self.docs_consumed,
            "epoch": self.epoch,
            "batches": self.batches,
            "buffer": list(self.buffer),
            "schedule": self.schedule,
        }
        if self.mixtures is not None:
            state |= {"consumed": {str(b): n for b, n in self.consumed.items()}, "mixtures": self._mixture_doc()}
        return state

    def _mixture_doc(self) -> list:
        return [[m.until, list(m.buckets), list(m.weights) if m.weights else None] for m in self.mixtures or []]

    def load_state_dict(self, state: dict) -> None:
        if state["schedule"] != self.schedule:
            raise ValueError(f"saved schedule {state['schedule']} differs from the configured {self.schedule}")
        if state.get("mixtures") != (self._mixture_doc() if self.mixtures is not None else None):
            raise ValueError(f"saved mixture {state.get('mixtures')} differs from the configured {self._mixture_doc()}")
        self.docs_consumed, self.epoch, self.buffer = state["docs_consumed"], state["epoch"], list(state["buffer"])
        self.batches = state.get("batches", 0)
        if self.mixtures is not None:
            self.consumed = {int(b): n for b, n in state["consumed"].items()}

    def take_mixture(self) -> dict[int, float]:
        """The share of each bucket in the documents begun since the last call (the mixture the last batches
        actually read); every bucket of the schedule is listed."""
        total = sum(self.drawn.values())
        out = {b: self.drawn[b] / total if total else 0.0 for b in self.schedule}
        self.drawn.clear()
        return out

    def phase(self, step: int | None = None) -> int:
        """The mixture phase of a step (default: the batch being filled); 0 without a mixture."""
        if self.mixtures is None:
            return 0
        step = self.batches if step is None else step
        return self.config.phase_at(step / self.total_steps)

    def __iter__(self) -> Iterator[torch.Tensor]:
        row = self.config.seq_len + 1
        need = row * self.config.batch_size
        while len(self.buffer) >= need:  # a resumed buffer may already hold whole batches
            yield self._pop(need, row)
        if self.mixtures is not None:
            yield from self._mixed(need, row)
            return
        texts = self._training_texts()
        for _ in range(self.docs_consumed):  # resume: skip what an earlier run consumed, untokenized
            next(texts, None)
        while True:
            chunk = [t for _, t in zip(range(self.config.encode_batch_docs), texts)]
            for encoding, (bucket, _) in zip(self.tokenizer.encode_batch([t for _, t in chunk]), chunk):
                self.buffer.extend(encoding.ids)
                self.buffer.append(self.eos)
                self.docs_consumed += 1
                self.drawn[bucket] += 1
                while len(self.buffer) >= need:
                    yield self._pop(need, row)
            if not chunk:  # end of the schedule: the next iteration is a new epoch; the partial buffer carries over
                self.docs_consumed, self.epoch = 0, self.epoch + 1
                return

    def _pop(self, need: int, row: int) -> torch.Tensor:
        batch, self.buffer = self.buffer[:need], self.buffer[need:]
        self.batches += 1
        return torch.tensor(batch, dtype=torch.int64).view(self.config.batch_size, row)

    def _mixed(self, need: int, row: int) -> Iterator[torch.Tensor]:
        """Endless: document by document, its bucket drawn by the phase of the batch its first token lands in."""
        if self.total_steps is None:
            raise ValueError("a mix_schedule needs the run's steps to place its phases: PackedLoader(total_steps=...)")
        streams = {b: self._bucket_stream(b, self.consumed[b]) for b in self.schedule}
        while True:
            mixture = self.mixtures[self.phase()]
            bucket = draw_bucket(mixture, self.consumed, self.counts, _unit(self.config.mix_seed, self.docs_consumed))
            ids = next(streams[bucket])
            self.buffer.extend(ids)
            self.buffer.append(self.eos)
            self.docs_consumed += 1
            self.consumed[bucket] += 1
            self.drawn[bucket] += 1
            while len(self.buffer) >= need:
                yield self._pop(need, row)

    def _bucket_stream(self, bucket: int, consumed: int) -> Iterator[list[int]]:
        """Token ids of a bucket's training documents, pass after pass, from document `consumed` on (encoded a few
        at a time: the look-ahead is not state, a resumed stream encodes them again)."""
        skip, chunk = consumed % self.counts[bucket] if self.counts[bucket] else 0, []
        while True:
            texts = (
                t for i, t in self.reader.documents(bucket) if not is_validation(i, self.config.validation_fraction)
            )
            for text in texts:
                if skip:
                    skip -= 1
                    continue
                chunk.append(text)
                if len(chunk) == 64:
                    yield from (e.ids for e in self.tokenizer.encode_batch(chunk))
                    chunk = []
            yield from (e.ids for e in self.tokenizer.encode_batch(chunk))
            chunk = []


# -- rows rebuilt from a run folder (held-out evaluation, calibration) ------------------------------------


def validation_rows(loader: PackedLoader, cfg: TrainConfig) -> dict[int, torch.Tensor]:
    """Held-out documents of each bucket, packed into rows of seq_len + 1 tokens, capped per bucket."""
    row = cfg.data.seq_len + 1
    n_rows = max(1, cfg.val_tokens_per_bucket // row)
    out = {}
    for bucket, texts in loader.validation_texts().items():
        ids: list[int] = []
        for enc in loader.tokenizer.encode_batch(texts):
            ids += [*enc.ids, loader.eos]
            if len(ids) >= n_rows * row:
                break
        usable = min(n_rows, len(ids) // row) * row
        if usable:
            out[bucket] = torch.tensor(ids[:usable], dtype=torch.int64).view(-1, row)
    if not out:
        raise ValueError(
            f"{cfg.shard_dir}: no held-out validation rows (validation_fraction={cfg.data.validation_fraction}): "
            "raise it or give more documents"
        )
    return out


def run_validation_rows(run_dir: Path) -> dict[int, torch.Tensor]:
    """The held-out rows a finished or running run validates on, rebuilt from its folder (its config,
    shards and tokenizer): what inference measures quantized models on."""
    from model.tokenizer import TOKENIZER_FILE, load_tokenizer

    cfg = TrainConfig.from_file(Path(run_dir) / CONFIG_FILE)
    return validation_rows(PackedLoader(cfg.shard_dir, load_tokenizer(Path(run_dir) / TOKENIZER_FILE), cfg.data), cfg)


def run_training_rows(run_dir: Path, n_rows: int) -> torch.Tensor:
    """The first n_rows rows (seq_len + 1 tokens each) of the run's training stream: calibration data for
    quantization that the held-out rows never overlap."""
    from model.tokenizer import TOKENIZER_FILE, load_tokenizer

    cfg = TrainConfig.from_file(Path(run_dir) / CONFIG_FILE)
    loader = PackedLoader(cfg.shard_dir, load_tokenizer(Path(run_dir) / TOKENIZER_FILE), cfg.data, cfg.max_steps)
    rows: list[torch.Tensor] = []
    for batch in loader:
        rows += list(batch)
        if len(rows) >= n_rows:
            break
    return torch.stack(rows[:n_rows])
