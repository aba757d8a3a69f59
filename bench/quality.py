"""Quality benchmark: the fastText classifier on held-out labelled documents, scoring throughput, and
end-to-end curation throughput from raw documents to curriculum shards.

    .venv/bin/python bench/quality.py [--n-documents 50000]

Corpus: the sample builder's default mixture scaled to --n-documents (real documents, their exact and
near-duplicates, and 15% synthetic low-quality documents of five kinds, labelled in metadata).

1. Classifier: the documents are split 80/20 by a hash of their id. The classifier is trained as the
   quality_classifier asset trains it: the reference domains (pipelines.reference) as positives against
   junk made from their vocabulary, never the corpus; reference documents whose clean text appears in the
   held-out split are left out, so no held-out document was seen in training. It is then scored on the
   held-out split: real documents (positive) against the synthetic low-quality ones (negative).
2. End to end: every curation stage function on the whole corpus, timed one by one (the classifier is
   the one step 1 trained; its training time is counted once).
3. Scoring throughput: the trained model scores every document of raw_documents' Parquet output (what
   the stage reads in the pipeline), in 2 processes and in 1.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipelines.clean import CleanConfig, clean
from pipelines.curriculum import CurriculumConfig, build_curriculum
from pipelines.filters import FilterConfig, filter_documents
from pipelines.ingest import ingest
from pipelines.near_dedup import NearDedupConfig, near_dedup
from pipelines.quality import (
    QualityModelConfig,
    QualityScorer,
    precision_recall_f1,
    roc_auc,
    train_quality_classifier,
)
from pipelines.quality_score import ScoreConfig, score_documents, score_texts
from pipelines.reference import reference_domains
from pipelines.sample_corpus import SampleCorpusConfig, build_sample_corpus
from pipelines.text import normalize_text

ROOT = Path(__file__).resolve().parents[1]


def held_out(doc_id: str) -> bool:
    return hashlib.blake2b(doc_id.encode(), digest_size=2).digest()[0] < 0.2 * 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-documents", type=int, default=50_000)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "quality"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "quality.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.n_documents}.jsonl.gz"
    if not corpus.exists():
        print(f"building the {args.n_documents}-document corpus ...", flush=True)
        build_sample_corpus(corpus, SampleCorpusConfig(n_documents=args.n_documents))
    results: dict = {"n_documents": args.n_documents}

    # --- 1. classifier on a held-out labelled split ---------------------------------------------
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    test_rows = [r for r in rows if held_out(r["id"])]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        held_texts = {normalize_text(r["text"]) for r in test_rows}
        reference = [
            d for docs in reference_domains().values() for d in docs if normalize_text(d.text) not in held_texts
        ]
        positives = tmp / "reference.jsonl"
        positives.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in reference))
        started = time.perf_counter()
        config = QualityModelConfig(measure_transfer=False)  # bench/curation_transfer.py measures transfer
        metrics = train_quality_classifier(None, work / "model", [str(positives)], config, log=None)
        train_seconds = time.perf_counter() - started
    scorer = QualityScorer(work / "model" / "model.bin")
    scores = scorer.score([r["text"] for r in test_rows])
    labels = np.array(["synthetic_low_quality" not in r["metadata"] for r in test_rows])
    table = []
    for threshold in (0.25, 0.5):
        p, r, f = precision_recall_f1(scores, labels, threshold)
        table.append({"threshold": threshold, "precision": p, "recall": r, "f1": f})
    auc = roc_auc(scores, labels)
    results["classifier"] = {
        "n_held_out_real": int(labels.sum()),
        "n_held_out_low_quality": int((~labels).sum()),
        "n_reference_positives": len(reference),
        "roc_auc": auc,
        "at_threshold": table,
        "train_validation": {"precision": metrics.precision, "recall": metrics.recall, "roc_auc": metrics.roc_auc},
        "train_seconds": train_seconds,
    }
    print(f"\n## Classifier: held-out split, {int(labels.sum())} real vs {int((~labels).sum())} low-quality documents")
    print("| threshold | precision | recall | F1 | ROC-AUC |\n|---|---|---|---|---|")
    for row in table:
        print(f"| {row['threshold']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {auc:.4f} |")
    kinds = {}
    for r, s in zip(test_rows, scores):
        kind = r["metadata"].get("synthetic_low_quality", "real: " + r["source"])
        kinds.setdefault(kind, []).append(float(s))
    print("\n| held-out group | documents | mean score | share >= 0.25 |\n|---|---|---|---|")
    for kind, values in sorted(kinds.items()):
        print(f"| {kind} | {len(values)} | {np.mean(values):.3f} | {np.mean(np.array(values) >= 0.25):.3f} |")
    results["score_by_group"] = {k: {"n": len(v), "mean": float(np.mean(v))} for k, v in kinds.items()}

    # --- 2. end to end ----------------------------------------------------------------------------
    d = work / "e2e"
    stages = [
        ("raw_documents", lambda: ingest([str(corpus)], d / "raw", log=None)),
        ("clean_documents", lambda: clean([str(d / "raw/documents.parquet")], d / "clean", CleanConfig(), log=None)),
        (
            "near_dedup_documents",
            lambda: near_dedup([str(d / "clean/documents.parquet")], d / "near", NearDedupConfig(), log=None),
        ),
        (
            "filtered_documents",
            lambda: filter_documents([str(d / "near/documents.parquet")], d / "filtered", FilterConfig(), log=None),
        ),
        (
            "scored_documents",
            lambda: score_documents(
                [str(d / "filtered/documents.parquet")], d / "scored", work / "model" / "model.bin", log=None
            ),
        ),
        (
            "curriculum_shards",
            lambda: build_curriculum([str(d / "scored/documents.parquet")], d / "shards", CurriculumConfig(), log=None),
        ),
    ]
    timings = []
    for name, run in stages:
        started = time.perf_counter()
        stats = run()
        timings.append((name, stats.n_in, stats.n_kept, time.perf_counter() - started))
    total = sum(t[3] for t in timings) + train_seconds
    raw_mb = pq.read_table(d / "raw/documents.parquet", columns=["text"])["text"].to_pylist()
    raw_mb = sum(len(t.encode()) for t in raw_mb) / 1e6
    results["end_to_end"] = {
        "stages": [{"stage": n, "in": i, "kept": k, "seconds": s} for n, i, k, s in timings],
        "quality_classifier_seconds": train_seconds,
        "total_seconds": total,
        "docs_per_s": args.n_documents / total,
        "mb_per_s": raw_mb / total,
    }
    print(f"\n## End to end: {args.n_documents} raw documents ({raw_mb:.1f} MB) to curriculum shards")
    print("| stage | in | kept | seconds | docs/s (of its input) |\n|---|---|---|---|---|")
    for name, n_in, kept, seconds in timings[:4]:
        print(f"| {name} | {n_in:,} | {kept:,} | {seconds:.1f} | {n_in / seconds:,.0f} |")
    print(f"| quality_classifier (training) | - | - | {train_seconds:.1f} | - |")
    for name, n_in, kept, seconds in timings[4:]:
        print(f"| {name} | {n_in:,} | {kept:,} | {seconds:.1f} | {n_in / seconds:,.0f} |")
    print(f"| **total** | {args.n_documents:,} | {timings[-1][2]:,} | {total:.1f} | "
          f"{args.n_documents / total:,.0f} docs/s, {raw_mb / total:.2f} MB/s |")  # fmt: skip
    # --- 3. scoring throughput ------------------------------------------------------------------
    raw_parquet = d / "raw" / "documents.parquet"  # what the scoring stage reads in the pipeline: Parquet
    texts_mb = sum(len(r["text"].encode()) for r in rows) / 1e6
    throughput = {}
    for workers in (2, 1):
        started = time.perf_counter()
        ids, _ = score_texts([str(raw_parquet)], work / "model" / "model.bin", ScoreConfig(workers=workers))
        seconds = time.perf_counter() - started
        throughput[workers] = {"docs_per_s": len(ids) / seconds, "mb_per_s": texts_mb / seconds, "seconds": seconds}
    results["scoring"] = throughput
    print(f"\n## Scoring throughput ({len(rows)} documents, {texts_mb:.1f} MB, reading Parquet included)")
    print("| processes | docs/s | MB/s | seconds |\n|---|---|---|---|")
    for workers, t in throughput.items():
        print(f"| {workers} | {t['docs_per_s']:,.0f} | {t['mb_per_s']:.1f} | {t['seconds']:.2f} |")

    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
