"""scored_documents: every document gets a fastText `quality_score`; the best are kept.

CLI: python -m pipelines.quality_score --model FILE --input docs.jsonl --output DIR
     [--threshold 0.5 | --top-fraction 0.8]
writes DIR/scores.parquet (id, quality_score for every valid input document), DIR/documents.parquet
(kept documents with their quality_score), DIR/ledger.parquet and DIR/stats.json.

Two modes: keep documents with quality_score >= threshold, or keep the top fraction by score (ties
broken by input order, so exactly round(fraction * N) documents are kept). Dropped: `low_quality`.
Memory: one float32 score per document; texts are streamed twice.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.cli import reader_config, run_stage, stage_parser
from pipelines.document import DOCUMENT_SCHEMA, Document, Ledger
from pipelines.parallel import batched, default_workers, ordered_map
from pipelines.progress import track
from pipelines.quality import KEEP_THRESHOLD, QualityScorer
from pipelines.readers import ReaderConfig, count_records, read_documents
from pipelines.stage import DOCUMENTS_FILE, DocumentWriter, StageStats, finish_stage, logger, write_table

STAGE = "scored_documents"
SCORES_FILE = "scores.parquet"
SCORED_SCHEMA = DOCUMENT_SCHEMA.append(pa.field("quality_score", pa.float32(), nullable=False))
SCORES_SCHEMA = pa.schema(
    [pa.field("id", pa.string(), nullable=False), pa.field("quality_score", pa.float32(), nullable=False)]
)


@dataclass(kw_only=True, slots=True)
class ScoreConfig:
    """Which scored documents are kept."""

    mode: str = "threshold"
    """"threshold" keeps quality_score >= threshold; "top_fraction" keeps the best top_fraction."""
    threshold: float = KEEP_THRESHOLD
    """Used in threshold mode."""
    top_fraction: float = 0.8
    """Used in top_fraction mode."""
    workers: int = field(default_factory=default_workers)
    batch_docs: int = 1024
    reader: ReaderConfig = field(default_factory=ReaderConfig)

    def check(self) -> None:
        if self.mode not in ("threshold", "top_fraction"):
            raise ValueError(f"score mode must be 'threshold' or 'top_fraction', not {self.mode!r}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")


@functools.lru_cache(maxsize=2)
def _loaded_scorer(model_path: str) -> QualityScorer:
    """One loaded model per process: worker tasks arrive pickled, so an attribute would not survive."""
    return QualityScorer(model_path)


@dataclass(frozen=True, slots=True)
class _ScoreTask:
    """Picklable task for worker processes: score a batch of texts."""

    model_path: str

    def __call__(self, texts: list[str]) -> np.ndarray:
        return _loaded_scorer(self.model_path).score(texts)


def keep_mask(scores: np.ndarray, config: ScoreConfig) -> np.ndarray:
    if config.mode == "threshold":
        return scores >= config.threshold
    n_keep = round(config.top_fraction * len(scores))
    order = np.lexsort((np.arange(len(scores)), -scores))  # best first, ties by input order
    kept = np.zeros(len(scores), dtype=bool)
    kept[order[:n_keep]] = True
    return kept


def score_texts(
    inputs: list[str], model_path: str | Path, config: ScoreConfig, log=None
) -> tuple[list[str], np.ndarray]:
    """ids and quality scores of every valid document of `inputs`, in input order."""
    ids, parts = [], []
    docs = (r for r in read_documents(inputs, config.reader) if isinstance(r, Document))
    for batch, scores in ordered_map(
        _ScoreTask(str(model_path)),
        batched(track(docs, desc=f"{STAGE}: scoring", total=count_records(inputs), log=log), config.batch_docs),
        payload=lambda batch: [d.text for d in batch],
        workers=config.workers,
    ):
        ids.extend(d.id for d in batch)
        parts.append(scores)
    return ids, (np.concatenate(parts) if parts else np.empty(0, dtype=np.float32))


def score_documents(
    inputs: list[str],
    output_dir: str | Path,
    model_path: str | Path,
    config: ScoreConfig | None = None,
    log: logging.Logger | None = logger,
) -> StageStats:
    config = config or ScoreConfig()
    config.check()
    _loaded_scorer(str(model_path))  # a bad model fails before any work; inline scoring reuses this load
    started = time.monotonic()
    output_dir = Path(output_dir)
    ids, scores = score_texts(inputs, model_path, config, log)
    if not ids:
        raise ValueError(f"{STAGE}: no documents to score in {', '.join(inputs)} (did the filters drop everything?)")
    kept = keep_mask(scores, config)
    scores_file = write_table(
        pa.Table.from_pydict({"id": ids, "quality_score": scores}, schema=SCORES_SCHEMA), output_dir / SCORES_FILE
    )

    ledger = Ledger(STAGE)
    bytes_in, position = 0, 0
    cutoff = float(scores[kept].min()) if kept.any() else float("inf")
    with DocumentWriter(output_dir / DOCUMENTS_FILE, SCORED_SCHEMA) as writer:
        for record in read_documents(inputs, config.reader):
            if not isinstance(record, Document):
                ledger.rejected(record)
                continue
            assert record.id == ids[position], "input changed between the two passes"
            bytes_in += len(record.text.encode("utf-8"))
            score = float(scores[position])
            if kept[position]:
                writer.write(record, quality_score=score)
                ledger.kept(record)
            else:
                ledger.dropped(record.id, "low_quality", f"quality_score {score:.4f} < {cutoff:.4f}", record.location)
            position += 1
    extra = {
        "mode": config.mode,
        "threshold": config.threshold if config.mode == "threshold" else cutoff,
        "score_quantiles": {f"p{q}": round(float(np.percentile(scores, q)), 4) for q in (5, 25, 50, 75, 95)},
    }
    files = [writer, scores_file]
    return finish_stage(output_dir, ledger, started, files, bytes_in=bytes_in, bytes_kept=writer.n_bytes, extra=extra)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fastText model file (quality_classifier's model.bin)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None, help="keep quality_score >= this")
    group.add_argument("--top-fraction", type=float, default=None, help="keep the best fraction")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    config = ScoreConfig(workers=args.workers, reader=reader_config(args))
    if args.top_fraction is not None:
        config.mode, config.top_fraction = "top_fraction", args.top_fraction
    elif args.threshold is not None:
        config.threshold = args.threshold
    return run_stage(score_documents, args.input, args.output, args.model, config)


if __name__ == "__main__":
    raise SystemExit(main())
