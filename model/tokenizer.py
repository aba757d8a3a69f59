"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers` on the curriculum shards.

CLI: python -m model.tokenizer --shards DIR --output DIR [--vocab-size 8192]

Byte-level: every string, in any script, encodes and decodes back exactly (no normaliser, no unknown
token); merges are learned from the shard texts in curriculum order. Special tokens: bos, eos, pad, with
ids 0, 1, 2.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.cli import run_stage
from pipelines.curriculum import MANIFEST_FILE
from pipelines.stage import atomic_path

TOKENIZER_FILE = "tokenizer.json"
STATS_FILE = "tokenizer_stats.json"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    """Byte-level BPE training."""

    vocab_size: int = 8192
    """Vocabulary size, special tokens and the 256 byte symbols included."""
    min_frequency: int = 2
    """A merge needs a pair seen at least this often."""
    special_tokens: tuple[str, ...] = field(default=(BOS, EOS, PAD))
    """bos, eos, pad: ids 0, 1, 2."""
    max_chars: int | None = None
    """Train on at most this many characters of shard text (None: all of it)."""

    def check(self) -> None:
        if self.vocab_size < 256 + len(self.special_tokens) + 1:
            raise ValueError(f"vocab_size {self.vocab_size} is too small: 256 byte symbols and the special tokens")


@dataclass(slots=True)
class TokenizerStats:
    vocab_size: int
    n_documents: int
    n_chars: int
    chars_per_token: float
    seconds: float


def shard_paths(shard_dir: str | Path) -> list[Path]:
    """The shards listed in manifest.json, in curriculum order; a clear error when there are none."""
    shard_dir = Path(shard_dir)
    manifest_path = shard_dir / MANIFEST_FILE
    if not manifest_path.exists():
        raise ValueError(f"{manifest_path}: no manifest (materialize curriculum_shards first)")
    shards = [shard_dir / s["path"] for s in json.loads(manifest_path.read_text())["shards"]]
    missing = [str(p) for p in shards if not p.exists()]
    if not shards or missing:
        raise ValueError(f"{shard_dir}: {'missing shards ' + ', '.join(missing) if missing else 'no shards'}")
    return shards


def iter_texts(shards: list[Path], max_chars: int | None = None) -> Iterator[str]:
    seen = 0
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if max_chars is not None and seen >= max_chars:
                    return
                seen += len(text)
                yield text


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    shard_dir: str | Path, output_dir: str | Path, config: TokenizerConfig | None = None
) -> TokenizerStats:
    """Train on the shards' texts; write tokenizer.json and tokenizer_stats.json into output_dir."""
    from tokenizers import pre_tokenizers, trainers

    config = config or TokenizerConfig()
    config.check()
    started = time.monotonic()
    shards = shard_paths(shard_dir)
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(config.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(iter_texts(shards, config.max_chars))
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(output_dir / TOKENIZER_FILE)
    tokenizer.save(str(tmp))
    os.replace(tmp, output_dir / TOKENIZER_FILE)

    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    stats = TokenizerStats(
        vocab_size=tokenizer.get_vocab_size(),
        n_documents=len(texts),
        n_chars=n_chars,
        chars_per_token=round(n_chars / max(n_tokens, 1), 3),
        seconds=round(time.monotonic() - started, 2),
    )
    tmp = atomic_path(output_dir / STATS_FILE)
    tmp.write_text(json.dumps({"stats": asdict(stats), "config": asdict(config)}, indent=2))
    os.replace(tmp, output_dir / STATS_FILE)
    return stats


def load_tokenizer(path: str | Path):
    """tokenizer.json -> tokenizers.Tokenizer, with a clear error for a missing or broken file."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from e
    for token in (BOS, EOS, PAD):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{path}: special token {token} is missing")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="curriculum_shards folder (with manifest.json)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--vocab-size", type=int, default=TokenizerConfig().vocab_size)
    args = parser.parse_args(argv)
    return run_stage(train_tokenizer, args.shards, args.output, TokenizerConfig(vocab_size=args.vocab_size))


if __name__ == "__main__":
    raise SystemExit(main())
