"""Training data from the curriculum shards: documents tokenized, joined with eos and packed into
fixed-length sequences, in curriculum order, deterministic and resumable.

The bucket schedule says which buckets are read and in what order (default: the manifest's order,
bucket 0 first). A held-out share of each bucket (chosen by a hash of the document id, so it never
changes) is kept out of training and serves the per-bucket validation loss.

Resuming: `state_dict()` records how many documents of the stream were consumed and the tokens left
over in the packing buffer; a loader given that state continues with exactly the batches an
uninterrupted one would have produced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
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

    def documents(self, bucket: int) -> Iterator[tuple[str, str]]:
        """(id, text) of a bucket's documents, shard by shard."""
        for shard in self.manifest["shards"]:
            if str(bucket) not in shard["bucket_counts"]:
                continue
            table = pq.read_table(self.shard_dir / shard["path"], columns=["id", "text", "bucket"])
            table = table.filter(pc.equal(table["bucket"], bucket))
            yield from zip(table["id"].to_pylist(), table["text"].to_pylist())


class PackedLoader:
    """Batches (batch_size, seq_len + 1) of int64 token ids; one pass over the schedule per epoch."""

    def __init__(self, shard_dir: str | Path, tokenizer, config: DataConfig):
        self.reader = ShardReader(shard_dir)
        self.tokenizer = tokenizer
        self.config = config
        self.eos = tokenizer.token_to_id(EOS)
        if self.eos is None:
            raise ValueError(f"the tokenizer has no {EOS} token")
        schedule = config.bucket_schedule if config.bucket_schedule is not None else self.reader.buckets()
        unknown = sorted(set(schedule) - set(self.reader.buckets()))
        if unknown:
            raise ValueError(f"bucket_schedule names buckets {unknown}; the shards have {self.reader.buckets()}")
        self.schedule = list(schedule)
        self.docs_consumed = 0
        self.epoch = 0
        self.buffer: list[int] = []

    def _training_texts(self) -> Iterator[str]:
        for bucket in self.schedule:
            for doc_id, text in self.reader.documents(bucket):
                if not is_validation(doc_id, self.config.validation_fraction):
                    yield text

    def validation_texts(self) -> dict[int, list[str]]:
        """Held-out documents of each bucket."""
        out: dict[int, list[str]] = {}
        for bucket in self.reader.buckets():
            out[bucket] = [
                t for i, t in self.reader.documents(bucket) if is_validation(i, self.config.validation_fraction)
            ]
        return out

    def state_dict(self) -> dict:
        return {
            "docs_consumed": self.docs_consumed,
            "epoch": self.epoch,
            "buffer": list(self.buffer),
            "schedule": self.schedule,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["schedule"] != self.schedule:
            raise ValueError(f"saved schedule {state['schedule']} differs from the configured {self.schedule}")
        self.docs_consumed, self.epoch, self.buffer = state["docs_consumed"], state["epoch"], list(state["buffer"])

    def __iter__(self) -> Iterator[torch.Tensor]:
        row = self.config.seq_len + 1
        need = row * self.config.batch_size
        texts = self._training_texts()
        for _ in range(self.docs_consumed):  # resume: skip what an earlier run consumed, untokenized
            next(texts, None)
        while len(self.buffer) >= need:  # a resumed buffer may already hold whole batches
            batch, self.buffer = self.buffer[:need], self.buffer[need:]
            yield torch.tensor(batch, dtype=torch.int64).view(self.config.batch_size, row)
        while True:
            chunk = [t for _, t in zip(range(self.config.encode_batch_docs), texts)]
            for encoding in self.tokenizer.encode_batch(chunk):
                self.buffer.extend(encoding.ids)
                self.buffer.append(self.eos)
                self.docs_consumed += 1
                while len(self.buffer) >= need:
                    batch, self.buffer = self.buffer[:need], self.buffer[need:]
                    yield torch.tensor(batch, dtype=torch.int64).view(self.config.batch_size, row)
            if not chunk:  # end of the schedule: the next iteration is a new epoch; the partial buffer carries over
                self.docs_consumed, self.epoch = 0, self.epoch + 1
                return


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
    loader = PackedLoader(cfg.shard_dir, load_tokenizer(Path(run_dir) / TOKENIZER_FILE), cfg.data)
    rows: list[torch.Tensor] = []
    for batch in loader:
        rows += list(batch)
        if len(rows) >= n_rows:
            break
    return torch.stack(rows[:n_rows])
