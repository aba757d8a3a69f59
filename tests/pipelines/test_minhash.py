import re

import numpy as np
import pytest

from pipelines.minhash import (
    MinHasher,
    Shingler,
    estimated_jaccard,
    jaccard,
    lsh_candidate_pairs,
    lsh_params_for_threshold,
    tokenize_words,
    union_find_clusters,
)
from tests.conftest import prose


def reference_shingles(text: str, n: int) -> set[tuple[str, ...]]:
    words = tokenize_words(text)
    if 0 < len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog. The quick brown fox!",
        "Ünïcödé wörds, ß and 東京 tokens; snake_case and CamelCase 42 times",
        "one two three",
        "",
        "  ...  !!! ",
        "a\x00b c d e f g",  # NUL inside a text must not split documents
    ],
)
def test_shingle_set_matches_regex_reference(text):
    shingles = Shingler(5).shingle_set(text)
    assert len(shingles) == len(reference_shingles(text.replace("\x00", " "), 5))


def test_tokenizer_matches_python_regex_on_bmp_text():
    text = "Hello, World! naïve café_au-lait 123abc Σίσυφος ١٢٣"
    assert tokenize_words(text) == re.findall(r"\w+", text.lower())


def test_batch_equals_one_by_one():
    texts = [prose(i, 40) for i in range(5)] + ["", "short text"]
    shingler = Shingler(5)
    x, doc = shingler.batch(texts)
    for i, t in enumerate(texts):
        assert np.array_equal(np.unique(x[doc == i]), shingler.shingle_set(t))


def test_estimated_jaccard_is_close_to_exact():
    base = prose(1, 400).split()
    edited = base.copy()
    for i in range(0, 400, 40):  # 10 substitutions -> about 50 of 396 shingles change
        edited[i] = "zzz"
    a, b = " ".join(base), " ".join(edited)
    shingler = Shingler(5)
    exact = jaccard(shingler.shingle_set(a), shingler.shingle_set(b))
    sig = MinHasher(num_perm=256, seed=3).signatures([a, b])
    est = estimated_jaccard(sig, np.array([[0, 1]]))[0]
    assert 0.6 < exact < 0.9
    assert abs(est - exact) < 4 * np.sqrt(exact * (1 - exact) / 256)  # 4 standard deviations


def test_signatures_are_deterministic_and_batch_independent():
    texts = [prose(i) for i in range(20)]
    one = MinHasher(seed=7, batch_chars=100).signatures(texts)  # many small batches
    two = MinHasher(seed=7).signatures(texts)
    assert one.dtype == np.uint32 and one.shape == (20, 128)
    assert np.array_equal(one, two)
    assert not np.array_equal(one, MinHasher(seed=8).signatures(texts))


def test_lsh_finds_near_duplicates_and_not_strangers():
    base = [prose(i, 200) for i in range(30)]
    near = [t + " appended footer words here" for t in base[:10]]
    sig = MinHasher().signatures(base + near)
    bands, rows = lsh_params_for_threshold(0.8, 128)
    pairs = {tuple(p) for p in lsh_candidate_pairs(sig, bands, rows).tolist()}
    assert {(i, 30 + i) for i in range(10)} <= pairs
    assert all(j - i == 30 for i, j in pairs)


def test_large_bucket_is_connected_linearly():
    sig = MinHasher().signatures(["same text in every doc"] * 50)
    pairs = lsh_candidate_pairs(sig, 16, 8, max_bucket_pairs=20)
    assert len(pairs) < 50 * 49 / 2
    assert set(union_find_clusters(50, pairs).tolist()) == {0}


def test_empty_documents_are_never_candidates():
    sig = MinHasher().signatures(["", "", "...", prose(1)])
    assert len(lsh_candidate_pairs(sig, 16, 8)) == 0


def test_union_find_labels_are_component_minimum():
    labels = union_find_clusters(7, np.array([[5, 6], [1, 3], [3, 6], [2, 4]]))
    assert labels.tolist() == [0, 1, 2, 1, 2, 1, 1]


def test_lsh_params_put_threshold_on_the_steep_part():
    bands, rows = lsh_params_for_threshold(0.8, 128)
    assert bands * rows <= 128
    p_candidate = 1 - (1 - 0.8**rows) ** bands
    assert p_candidate > 0.98
    with pytest.raises(ValueError, match="threshold"):
        lsh_params_for_threshold(1.5, 128)
