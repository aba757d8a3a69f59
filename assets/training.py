"""Training assets. So far: the byte-level BPE tokenizer trained on the curriculum shards."""

import dagster as dg

from assets.metadata import md_table
from assets.quality import curriculum_shards
from assets.resources import CurationPaths, WandbResource
from model.tokenizer import TOKENIZER_FILE, TokenizerConfig, iter_texts, load_tokenizer, shard_paths, train_tokenizer

GROUP = "training"


class TokenizerAssetConfig(dg.Config):
    vocab_size: int = 8192
    """Vocabulary size, special tokens (bos, eos, pad) and the 256 byte symbols included."""
    min_frequency: int = 2
    max_chars: int | None = None
    """Train on at most this many characters of shard text (unset: all)."""


@dg.asset(group_name=GROUP, kinds={"huggingface"}, deps=[curriculum_shards])
def tokenizer(
    context: dg.AssetExecutionContext, config: TokenizerAssetConfig, paths: CurationPaths, wandb: WandbResource
) -> dg.MaterializeResult:
    """A byte-level BPE (Hugging Face tokenizers) trained on curriculum_shards: tokenizer.json."""
    shard_dir = paths.stage_dir("curriculum_shards")
    out_dir = paths.stage_dir("tokenizer")
    stats = train_tokenizer(shard_dir, out_dir, TokenizerConfig(**config.model_dump()))
    context.log.info(f"tokenizer: {stats}")
    tok = load_tokenizer(out_dir / TOKENIZER_FILE)
    sample = next(iter_texts(shard_paths(shard_dir)))[:200]
    pieces = tok.encode(sample).tokens[:40]
    summary = {
        "vocab_size": stats.vocab_size,
        "chars_per_token": stats.chars_per_token,
        "n_documents": stats.n_documents,
        "seconds": stats.seconds,
    }
    run_dir = wandb.log_run(context, "tokenizer", summary, config=config.model_dump())
    metadata = {
        **summary,
        "example": dg.MetadataValue.md(md_table(("text", "tokens"), [(sample[:120], " · ".join(pieces))])),
        "path": dg.MetadataValue.path(str(out_dir / TOKENIZER_FILE)),
    }
    if run_dir:
        metadata["wandb_run"] = dg.MetadataValue.path(run_dir)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(asset=tokenizer, description="Shard texts encode and decode back exactly.")
def tokenizer_round_trips(paths: CurationPaths) -> dg.AssetCheckResult:
    tok = load_tokenizer(paths.stage_dir("tokenizer") / TOKENIZER_FILE)
    texts = [t for t, _ in zip(iter_texts(shard_paths(paths.stage_dir("curriculum_shards"))), range(200))]
    failures = [t[:80] for t in texts if tok.decode(tok.encode(t).ids, skip_special_tokens=False) != t]
    return dg.AssetCheckResult(
        passed=not failures,
        metadata={
            "n_checked": len(texts),
            "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in failures) or "none"),
        },
    )
