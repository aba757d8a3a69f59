import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.quality import (
    QualityModelConfig,
    QualityScorer,
    resemblance,
    roc_auc,
    train_quality_classifier,
    transfer_by_domain,
)
from pipelines.quality_score import ScoreConfig, keep_mask, score_documents
from pipelines.readers import InputError
from pipelines.reference import ReferenceConfig, junk_documents, reference_domains
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
FAST = QualityModelConfig(epoch=15, min_examples_per_class=20, threads=1)


def prose_doc(i: int) -> str:
    topics = ["river", "library", "garden", "harbour", "museum", "market", "forest", "station"]
    t = topics[i % len(topics)]
    return (
        f"The {t} near the old town was rebuilt in the last century, and it is now one of the places that "
        f"visitors remember. Local historians describe how the {t} changed after the war, when families "
        f"returned and shops opened again. Today the {t} is quiet in the morning and busy in the evening."
    )


def junk_doc(i: int) -> str:
    return f"BUY NOW cheap deal {i} click here $$$ best price free offer " * 5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    pos = write_jsonl(d / "pos.jsonl", [{"id": f"p{i}", "text": prose_doc(i)} for i in range(60)])
    raw = write_jsonl(d / "raw.jsonl", [{"id": f"r{i}", "text": junk_doc(i)} for i in range(60)])
    metrics = train_quality_classifier([str(raw)], d / "model", [str(pos)], FAST, log=None)
    return d / "model", metrics


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    pairs = [(s, t) for (s, a), (t, b) in itertools.product(zip(scores, labels), repeat=2) if a == 1 and b == 0]
    expected = np.mean([1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs])
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_classifier_separates_and_reports_held_out_metrics(model):
    model_dir, metrics = model
    # negatives: the 60 given plus 60 junk pages made from the positives' vocabulary
    assert metrics.n_validation_positive == 12 and metrics.n_validation_negative == 24
    assert metrics.roc_auc > 0.95 and metrics.f1 > 0.8
    scorer = QualityScorer(model_dir / "model.bin")
    good, bad = scorer.score([prose_doc(100), junk_doc(100)])
    assert good > 0.5 > bad
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["config"]["max_chars"] == FAST.max_chars


def test_too_few_examples_gives_the_counts(tmp_path):
    pos = write_jsonl(tmp_path / "pos.jsonl", [{"id": f"p{i}", "text": prose_doc(i)} for i in range(5)])
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"id": f"r{i}", "text": junk_doc(i)} for i in range(70)])
    with pytest.raises(ValueError, match=r"5 positives .* 75 negatives.* need 20"):
        train_quality_classifier([str(raw)], tmp_path / "m", [str(pos)], FAST, log=None)


def test_missing_reference_set_names_the_path(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"id": "r", "text": "x"}])
    with pytest.raises(InputError, match=r"missing_ref\.jsonl"):
        train_quality_classifier([str(raw)], tmp_path / "m", [str(tmp_path / "missing_ref.jsonl")], FAST, log=None)


def test_a_model_file_that_does_not_load_is_named(tmp_path):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"broken\.bin"):
        QualityScorer(bad)
    with pytest.raises(ValueError, match=r"nothere\.bin"):
        QualityScorer(tmp_path / "nothere.bin")


def test_keep_modes():
    scores = np.array([0.9, 0.1, 0.5, 0.5, 0.7], dtype=np.float32)
    assert keep_mask(scores, ScoreConfig(threshold=0.5)).tolist() == [True, False, True, True, True]
    # top 40% of 5 = 2 documents: the best two, ties broken by input order
    assert keep_mask(scores, ScoreConfig(mode="top_fraction", top_fraction=0.6)).tolist() == [
        True,
        False,
        True,
        False,
        True,
    ]


def test_scored_stage_and_cli(model, tmp_path):
    model_dir, _ = model
    rows = [{"id": f"g{i}", "text": prose_doc(i + 200)} for i in range(5)] + [
        {"id": f"j{i}", "text": junk_doc(i + 200)} for i in range(5)
    ]
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    stats = score_documents([str(src)], tmp_path / "s", model_dir / "model.bin", ScoreConfig(threshold=0.5, workers=1))
    assert stats.n_kept == 5 and stats.drop_reasons == {"low_quality": 5}
    kept = pq.read_table(tmp_path / "s" / "documents.parquet")
    assert sorted(kept["id"].to_pylist()) == [f"g{i}" for i in range(5)]

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "pipelines.quality_score", "--model", str(model_dir / "model.bin")]
    result = subprocess.run(
        [*cmd, "--input", str(src), "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    scores = pq.read_table(out / "scores.parquet")
    assert scores.column_names == ["id", "quality_score"] and scores.num_rows == 10
    assert scores["quality_score"].type == "float"


def test_training_is_reproducible(model, tmp_path):
    model_dir, _ = model
    pos = model_dir.parent / "pos.jsonl"
    raw = model_dir.parent / "raw.jsonl"
    train_quality_classifier([str(raw)], tmp_path / "again", [str(pos)], FAST, log=None)
    assert (tmp_path / "again" / "model.bin").read_bytes() == (model_dir / "model.bin").read_bytes()


PYTHON_DOMAINS = ReferenceConfig(domains=("python-reference", "python-stdlib", "package-readmes"), max_per_domain=80)


def test_quality_transfers_to_a_domain_it_never_saw():
    """Leave one domain out: trained on the other reference domains against junk, the model keeps >= 80% of
    the held-out domain's real documents and <= 5% of junk made from its words (issue 15's target)."""
    domains = reference_domains(PYTHON_DOMAINS)
    assert set(domains) == set(PYTHON_DOMAINS.domains) and all(len(v) >= 20 for v in domains.values())
    results = transfer_by_domain(domains, QualityModelConfig(threads=1))
    assert [r["domain"] for r in results] == list(domains)
    for r in results:
        assert r["roc_auc"] >= 0.95 and r["real_kept"] >= 0.8 and r["junk_kept"] <= 0.05, r
    with pytest.raises(ValueError, match="at least two reference domains"):
        transfer_by_domain({"python-stdlib": domains["python-stdlib"]}, FAST)


def test_junk_is_made_from_the_given_words_in_every_kind():
    texts = [prose_doc(i) for i in range(20)]
    junk = junk_documents(texts, 10, "s")
    assert [d.id for d in junk] == [d.id for d in junk_documents(texts, 10, "s")]  # seeded
    assert {d.metadata["synthetic_low_quality"] for d in junk} == {
        "spam", "keyword_list", "boilerplate", "gibberish", "templated"
    }  # fmt: skip
    with pytest.raises(ValueError, match="too small a vocabulary"):
        junk_documents(["one two"], 5, "s")


def test_the_default_classifier_trains_on_no_corpus_and_says_how_positives_resemble_one(tmp_path):
    metrics = train_quality_classifier(None, tmp_path / "m", None, QualityModelConfig(
        epoch=5, threads=1, reference=PYTHON_DOMAINS, measure_transfer=False), log=None)  # fmt: skip
    assert set(metrics.positives_by_domain) == set(PYTHON_DOMAINS.domains)
    assert metrics.n_train_negative + metrics.n_validation_negative == sum(metrics.positives_by_domain.values())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["negatives"] == []
    pos = write_jsonl(tmp_path / "pos.jsonl", [{"id": f"p{i}", "text": prose_doc(i)} for i in range(10)])
    # prose_doc repeats every 8: texts 0-2 are the positives 0-2 and 8-9
    assert resemblance([str(pos)], [prose_doc(i) for i in range(3)] + ["other"]) == 0.5
