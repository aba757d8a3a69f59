"""sample_corpus: exact counts, unique ids, identical bytes on a rebuild, and labels that hold when
they are measured again with the reference functions (exact 5-gram Jaccard, normalize_text)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import pipelines.sample_corpus as sample_corpus
from pipelines.minhash import MinHasher, Shingler, jaccard, lsh_candidate_pairs, lsh_params_for_threshold
from pipelines.sample_corpus import (
    EXACT_DUPLICATE_VARIANTS,
    LOW_QUALITY_KINDS,
    NEAR_DUPLICATE_BANDS,
    SampleCorpusConfig,
    build_sample_corpus,
    debug_tiny,
    main,
)
from pipelines.text import normalize_text


def read_jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "corpus.jsonl.gz"
    stats = build_sample_corpus(path, debug_tiny())
    return path, stats, read_jsonl(path)


def bases_of(records: list[dict]) -> list[dict]:
    return [r for r in records if r["metadata"] == {}]


def test_exact_count_unique_ids_and_stats(corpus):
    path, stats, records = corpus
    assert len(records) == debug_tiny().n_documents == stats.n_documents
    assert len({r["id"] for r in records}) == len(records)
    assert all(set(r) == {"id", "text", "source", "metadata"} and r["text"] for r in records)
    assert sum(stats.n_by_source.values()) == len(records)
    assert len(bases_of(records)) == stats.n_bases
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # the temp file was renamed


def test_cli_rebuild_gives_identical_bytes(corpus, tmp_path, capsys):
    path, stats, _ = corpus
    again = tmp_path / "again.jsonl.gz"
    assert main(["--output", str(again), "--preset", "debug_tiny"]) == 0
    assert again.read_bytes() == path.read_bytes()
    assert json.loads(capsys.readouterr().out)["n_by_source"] == stats.n_by_source


def test_near_duplicates_have_their_recorded_jaccard_in_band(corpus):
    _, stats, records = corpus
    by_id = {r["id"]: r for r in records}
    near = [r for r in records if "near_duplicate_of" in r["metadata"]]
    assert len(near) == sum(stats.n_by_near_duplicate_level.values()) > 0
    assert {r["metadata"]["near_duplicate_level"] for r in near} == set(NEAR_DUPLICATE_BANDS)
    shingler = Shingler()
    for r in near:
        meta = r["metadata"]
        base = by_id[meta["near_duplicate_of"]]
        assert base["metadata"] == {} and r["source"] == base["source"]
        j = jaccard(shingler.shingle_set(base["text"]), shingler.shingle_set(r["text"]))
        assert round(j, 4) == meta["near_duplicate_jaccard"], r["id"]
        low, high = NEAR_DUPLICATE_BANDS[meta["near_duplicate_level"]]
        assert low <= meta["near_duplicate_jaccard"] < high, r["id"]
        edits = meta["near_duplicate_edit"].split(",")
        assert edits and set(edits) <= {"header", "footer", "substitute", "insert", "delete", "reorder"}


def test_exact_duplicates_normalize_to_their_base(corpus):
    _, stats, records = corpus
    by_id = {r["id"]: r for r in records}
    exact = [r for r in records if "exact_duplicate_of" in r["metadata"]]
    assert len(exact) == sum(stats.n_by_exact_duplicate_variant.values()) > 0
    for r in exact:
        base = by_id[r["metadata"]["exact_duplicate_of"]]
        assert r["metadata"]["exact_duplicate_variant"] in EXACT_DUPLICATE_VARIANTS
        assert r["source"] == base["source"]
        assert normalize_text(r["text"]) == normalize_text(base["text"]), r["id"]


def test_bases_are_pairwise_below_the_dedup_threshold(corpus):
    _, _, records = corpus
    bases = bases_of(records)
    threshold = debug_tiny().base_dedup_threshold
    assert len({normalize_text(b["text"]) for b in bases}) == len(bases)
    texts = [b["text"] for b in bases]
    pairs_P2 = lsh_candidate_pairs(MinHasher(num_perm=128).signatures(texts), *lsh_params_for_threshold(threshold, 128))
    shingler = Shingler()
    sets = [shingler.shingle_set(t) for t in texts]
    for i, j in pairs_P2.tolist():
        assert jaccard(sets[i], sets[j]) < threshold, (bases[i]["id"], bases[j]["id"])


def test_every_low_quality_kind_is_present_with_realistic_lengths(corpus):
    _, stats, records = corpus
    low = [r for r in records if "synthetic_low_quality" in r["metadata"]]
    assert {r["metadata"]["synthetic_low_quality"] for r in low} == set(LOW_QUALITY_KINDS)
    assert len(low) == sum(stats.n_by_low_quality_kind.values())
    for r in low:
        assert r["source"] == "synthetic-low-quality" and r["id"].startswith("lowq:")
        assert 30 <= len(r["text"].split()) <= 400, r["id"]


def test_config_validation_names_the_fields():
    with pytest.raises(ValueError, match=r"near_duplicate_fraction.*exact_duplicate_fraction.*low_quality_fraction"):
        SampleCorpusConfig(near_duplicate_fraction=0.6, low_quality_fraction=0.5)
    with pytest.raises(ValueError, match="unknown levels"):
        SampleCorpusConfig(near_duplicate_levels={"light": 1.0, "extreme": 1.0})
    assert SampleCorpusConfig(near_duplicate_levels={"heavy": 1.0}).near_duplicate_levels == (("heavy", 1.0),)


def test_short_of_real_text_it_derives_more_near_duplicates(tmp_path, monkeypatch):
    real = sample_corpus._read_base_documents

    def only_60(config, n_needed):
        bases, n_exact, n_near, used = real(config, n_needed)
        return bases[:60], n_exact, n_near, used

    monkeypatch.setattr(sample_corpus, "_read_base_documents", only_60)
    stats = build_sample_corpus(tmp_path / "x.jsonl", debug_tiny())
    records = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert len(records) == 300 and stats.n_bases == 60
    assert stats.n_extra_near_duplicates == 201 - 60
    assert sum(stats.n_by_near_duplicate_level.values()) == 45 + 141


def test_no_real_text_at_all_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_corpus, "_read_base_documents", lambda config, n_needed: ([], 0, 0, True))
    with pytest.raises(ValueError, match="no base documents available"):
        build_sample_corpus(tmp_path / "x.jsonl", debug_tiny())
    assert not list(tmp_path.iterdir())
