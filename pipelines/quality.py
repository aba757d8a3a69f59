"""quality_classifier: a fastText model of "reads like edited text, not junk".

Positives are edited reference text in several domains (pipelines.reference: the Python language reference,
the standard library's docstrings, package READMEs, the HTML books of installed toolchains, other HTML
manuals), or the files a user gives. Negatives are junk made from the positives' own vocabulary (spam,
keyword lists, boilerplate, gibberish, templated pages), plus any negative files a user gives, e.g. a sample
of a general web crawl. The corpus being curated is never part of the training set unless the user passes it:
trained against a sample of the very corpus it judges, a classifier learns "not this corpus" and drops a
clean documentation corpus as low quality.

The model's probability of the positive label is a document's `quality_score`. As in DCLM, text is
flattened to one line; we also cut it at `max_chars` so that scoring cost does not grow with document length.

Transfer is measured leave-one-domain-out (`transfer_by_domain`): trained on every reference domain but one,
the model scores the held-out domain's real documents against junk made from them.

CLI: python -m pipelines.quality --output DIR [--positives REF.jsonl ...] [--negatives CRAWL.jsonl ...]
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipelines.cli import run_stage
from pipelines.document import Document
from pipelines.readers import ReaderConfig, read_documents
from pipelines.reference import ReferenceConfig, junk_documents, reference_domains
from pipelines.stage import atomic_path, logger
from pipelines.text import normalize_text

MODEL_FILE = "model.bin"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
POSITIVE = "__label__hq"
NEGATIVE = "__label__cc"
KEEP_THRESHOLD = 0.25
"""The quality_score a document needs to be kept by default (scored_documents' threshold)."""


@dataclass(kw_only=True, slots=True)
class QualityModelConfig:
    """Training of the fastText quality classifier."""

    max_negatives: int = 20_000
    """At most this many documents of the negative files are used (a seeded sample)."""
    junk_per_positive: float = 1.0
    """Junk pages made per positive document."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Which reference domains make the positives when no positive files are given."""
    measure_transfer: bool = True
    """Also measure transfer leave-one-domain-out (one more model per domain; seconds each)."""
    transfer_threshold: float = KEEP_THRESHOLD
    """The quality_score threshold at which transfer reports the share of real documents and of junk kept
    (scored_documents' default)."""
    min_examples_per_class: int = 50
    """Fewer positives or negatives than this is an error."""
    validation_fraction: float = 0.2
    """Share of each class held out for precision, recall, F1 and ROC-AUC."""
    max_chars: int = 1000
    """Characters of a document the model reads (training and scoring)."""
    epoch: int = 25
    lr: float = 0.5
    dim: int = 16
    word_ngrams: int = 2
    """Word n-grams (DCLM: bigrams)."""
    char_ngrams: tuple[int, int] = (2, 4)
    """Sub-word character n-gram lengths (fastText minn, maxn): they let the model judge words it never
    saw, e.g. gibberish, which word features alone score near the class prior."""
    bucket: int = 200_000
    """Hash buckets for n-gram features (fastText's 2M default makes a 260 MB model)."""
    min_count: int = 2
    threads: int = 1
    """fastText training threads. One thread makes training reproducible (the same model bytes on a rerun);
    more threads are faster but update the weights in a racy order."""
    seed: int = 0
    """Seeds the negative sample, the split and fastText."""
    min_reference_words: int = 20
    """Reference documents need at least this many words."""


@dataclass(slots=True)
class ClassifierMetrics:
    n_train_positive: int
    n_train_negative: int
    n_validation_positive: int
    n_validation_negative: int
    precision: float
    recall: float
    f1: float
    roc_auc: float
    threshold: float = 0.5
    seconds: float = 0.0
    positives_by_domain: dict = field(default_factory=dict)
    """Training and validation positives per reference domain (or per positive file)."""
    transfer: list = field(default_factory=list)
    """Leave-one-domain-out: per held-out domain, its AUC and the shares of its real documents and of junk
    kept at transfer_threshold."""


def fasttext_line(text: str, max_chars: int) -> str:
    """One line of at most max_chars characters of lower-cased, white-space-normalised text."""
    return " ".join(text[:max_chars].lower().split())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties 1/2
    (the Mann-Whitney U statistic, from average ranks)."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs at least one positive and one negative")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank within ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall_f1(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> tuple[float, float, float]:
    predicted = scores >= threshold
    labels = labels.astype(bool)
    tp = int((predicted & labels).sum())
    precision = tp / max(int(predicted.sum()), 1)
    recall = tp / max(int(labels.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _texts(inputs: list[str], reader: ReaderConfig | None = None) -> list[Document]:
    return [r for r in read_documents(inputs, reader) if isinstance(r, Document)]


def _fit(pos: list[Document], neg: list[Document], config: QualityModelConfig, model_path: Path):
    """Train fastText on the two classes (seeded order) and save it to model_path atomically."""
    import fasttext

    lines = [f"{POSITIVE} {fasttext_line(d.text, config.max_chars)}" for d in pos]
    lines += [f"{NEGATIVE} {fasttext_line(d.text, config.max_chars)}" for d in neg]
    random.Random(f"{config.seed}:order").shuffle(lines)
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        model = fasttext.train_supervised(
            input=str(train_file),
            epoch=config.epoch,
            lr=config.lr,
            dim=config.dim,
            wordNgrams=config.word_ngrams,
            minn=config.char_ngrams[0],
            maxn=config.char_ngrams[1],
            bucket=config.bucket,
            minCount=config.min_count,
            thread=config.threads,
            seed=config.seed,
            verbose=0,
        )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_model = atomic_path(model_path)
    model.save_model(str(tmp_model))
    os.replace(tmp_model, model_path)


def _split(docs: list[Document], config: QualityModelConfig) -> tuple[list[Document], list[Document]]:
    docs = sorted(docs, key=lambda d: d.id)
    random.Random(f"{config.seed}:split").shuffle(docs)
    n_val = max(1, round(len(docs) * config.validation_fraction))
    return docs[n_val:], docs[:n_val]


def _junk_for(docs: list[Document], config: QualityModelConfig, seed: str) -> list[Document]:
    return junk_documents([d.text for d in docs], round(len(docs) * config.junk_per_positive), seed)


def transfer_by_domain(domains: dict[str, list[Document]], config: QualityModelConfig) -> list[dict]:
    """Leave-one-domain-out: for each domain, a model trained on the others (against junk made from them)
    scores this domain's real documents and junk made from this domain's vocabulary. Per domain: its counts,
    ROC-AUC, and the shares of real documents and of junk whose score reaches transfer_threshold."""
    if len(domains) < 2:
        raise ValueError(f"transfer needs at least two reference domains, got {list(domains)}")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for held_out, real in domains.items():
            train = [d for name, docs in domains.items() if name != held_out for d in docs]
            _fit(train, _junk_for(train, config, f"{config.seed}:transfer:{held_out}"), config, Path(tmp) / "m.bin")
            junk = _junk_for(real, config, f"{config.seed}:heldout:{held_out}")
            scorer = QualityScorer(Path(tmp) / "m.bin", config.max_chars)
            real_scores, junk_scores = scorer.score([d.text for d in real]), scorer.score([d.text for d in junk])
            labels = np.array([1] * len(real) + [0] * len(junk))
            out.append({
                "domain": held_out, "n_real": len(real), "n_junk": len(junk),
                "roc_auc": round(roc_auc(np.concatenate([real_scores, junk_scores]), labels), 4),
                "real_kept": round(float(np.mean(real_scores >= config.transfer_threshold)), 4),
                "junk_kept": round(float(np.mean(junk_scores >= config.transfer_threshold)), 4),
            })  # fmt: skip
    return out


def train_quality_classifier(
    negatives: list[str] | None,
    output_dir: str | Path,
    positives: list[str] | None = None,
    config: QualityModelConfig | None = None,
    log: logging.Logger | None = logger,
) -> ClassifierMetrics:
    """Train on positives (files, or the reference domains) against junk made from them plus the documents of
    `negatives` (files; none by default); write model.bin, config.json and metrics.json into output_dir."""
    config = config or QualityModelConfig()
    started = time.monotonic()
    output_dir = Path(output_dir)
    if positives:
        domains = {}
        for path in positives:
            domains[path] = _texts([path])
            if not domains[path]:
                raise ValueError(f"{path}: no positive (reference) documents in it")
        where = ", ".join(positives)
    else:
        domains = reference_domains(config.reference)
        where = "the reference domains " + ", ".join(f"{d} ({len(v)})" for d, v in domains.items())
    pos_docs = [d for docs in domains.values() for d in docs]
    if not pos_docs:
        raise ValueError(f"no positive (reference) documents found in {where or 'any reference domain'}")
    positive_texts = {normalize_text(d.text) for d in pos_docs}
    extra = [d for d in _texts(negatives) if normalize_text(d.text) not in positive_texts] if negatives else []
    if len(extra) > config.max_negatives:
        extra = random.Random(config.seed).sample(extra, config.max_negatives)
    neg_docs = _junk_for(pos_docs, config, f"{config.seed}:train") + extra
    if len(pos_docs) < config.min_examples_per_class or len(neg_docs) < config.min_examples_per_class:
        raise ValueError(
            f"too few examples to train the quality classifier: {len(pos_docs)} positives ({where}), "
            f"{len(neg_docs)} negatives; need {config.min_examples_per_class} of each"
        )
    pos_train, pos_val = _split(pos_docs, config)
    neg_train, neg_val = _split(neg_docs, config)
    _fit(pos_train, neg_train, config, output_dir / MODEL_FILE)

    scorer = QualityScorer(output_dir / MODEL_FILE, config.max_chars)
    val_scores = scorer.score([d.text for d in pos_val + neg_val])
    val_labels = np.array([1] * len(pos_val) + [0] * len(neg_val))
    precision, recall, f1 = precision_recall_f1(val_scores, val_labels)
    transfer = transfer_by_domain(domains, config) if config.measure_transfer and len(domains) > 1 else []
    metrics = ClassifierMetrics(
        n_train_positive=len(pos_train),
        n_train_negative=len(neg_train),
        n_validation_positive=len(pos_val),
        n_validation_negative=len(neg_val),
        precision=round(precision, 4),
        recall=round(recall, 4),
        f1=round(f1, 4),
        roc_auc=round(roc_auc(val_scores, val_labels), 4),
        seconds=round(time.monotonic() - started, 2),
        positives_by_domain={name: len(docs) for name, docs in domains.items()},
        transfer=transfer,
    )
    _write_json(
        output_dir / CONFIG_FILE,
        {"config": asdict(config), "positives": positives or "reference domains", "negatives": negatives or []},
    )
    _write_json(output_dir / METRICS_FILE, asdict(metrics))
    if log is not None:
        log.info(f"quality classifier: {metrics}")
    return metrics


def resemblance(positives: list[str], corpus_texts: list[str]) -> float:
    """The share of the positive files' documents whose normalized text is also in the corpus."""
    corpus = {normalize_text(t) for t in corpus_texts}
    docs = _texts(positives)
    return sum(normalize_text(d.text) in corpus for d in docs) / len(docs) if docs else 0.0


def _write_json(path: Path, payload: dict) -> None:
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


class QualityScorer:
    """Loads a trained model; `score(texts)` gives P(high quality) per text as float32."""

    def __init__(self, model_path: str | Path, max_chars: int | None = None):
        import fasttext

        model_path = Path(model_path)
        if not model_path.is_file():
            raise ValueError(f"{model_path}: quality model file not found")
        try:
            self.model = fasttext.load_model(str(model_path))
        except ValueError as e:
            raise ValueError(f"{model_path}: not a fastText model ({e})") from e
        if POSITIVE not in self.model.get_labels():
            raise ValueError(f"{model_path}: model has no {POSITIVE} label (labels: {self.model.get_labels()})")
        config_file = model_path.parent / CONFIG_FILE
        if max_chars is None:
            saved = json.loads(config_file.read_text())["config"] if config_file.exists() else {}
            max_chars = saved.get("max_chars", QualityModelConfig().max_chars)
        self.model_path = model_path
        self.max_chars = max_chars

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty(0, dtype=np.float32)
        labels, probs = self.model.predict([fasttext_line(t, self.max_chars) for t in texts], k=1)
        # Two classes: P(positive) is the top probability when the top label is positive, else 1 - it.
        top_is_positive = np.fromiter((lab[0] == POSITIVE for lab in labels), dtype=bool, count=len(texts))
        top_prob = np.fromiter((p[0] for p in probs), dtype=np.float32, count=len(texts))
        out = np.where(top_is_positive, top_prob, 1.0 - top_prob).astype(np.float32)
        return np.clip(out, 0.0, 1.0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negatives", nargs="*", default=None, help="extra negatives, e.g. a general crawl sample")
    parser.add_argument("--positives", nargs="*", default=None, help="reference set (default: the reference domains)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = QualityModelConfig(seed=args.seed)
    return run_stage(train_quality_classifier, args.negatives, args.output, args.positives, config)


if __name__ == "__main__":
    raise SystemExit(main())
