"""Vectorised MinHash + LSH: word n-gram shingles, signatures, banding, union-find.

Everything runs on batches of documents in numpy: no Python code runs per character, per word, per
shingle or per permutation. Batches are kept small (~200k characters, 4k shingles per block) because
fresh large allocations cost a page fault per 4 KiB, which dominates numpy's own work on this VM.

Shape legend: N documents, C characters, W words, S shingles (a batch's documents concatenated),
K permutations, B bands, R rows per band (B * R <= K), P candidate pairs.

Maths:
- Words are maximal runs of `\\w` characters (str.isalnum() or "_") of the lower-cased text, so
  tokenize_words(text) == re.findall(r"\\w+", text.lower()) for text in the Basic Multilingual
  Plane. A word hashes to 64 bits as a polynomial sum(c_i * P**(len-1-i)) mod 2**64, then mixed.
- A shingle is a word n-gram: h = w_0; h = h * M + w_j for j in 1..n-1 (mod 2**64), then mixed.
  A document with fewer than n words (but one or more) gets one shingle of all its words.
- Permutation k maps a shingle hash x to h_k(x) = ((a_k * x + b_k) mod 2**64) >> 32 with a_k odd
  (multiply-shift hashing, Dietzfelbinger et al.); the signature slot is the minimum over the
  document's shingles. P[sig_k(A) == sig_k(B)] ~= Jaccard(A, B).
- LSH: two documents become candidates when all R slots of at least one of B bands agree:
  probability 1 - (1 - J**R)**B, an S-curve whose midpoint is about (1 / B) ** (1 / R).
"""

from __future__ import annotations

import functools
import re

import numpy as np

_WORD_MIX = np.uint64(0x9E3779B97F4A7C15)  # combines word hashes into an n-gram hash
_CHAR_P = np.uint64(0x100000001B3)  # the FNV prime, as the polynomial base for word hashes
_EMPTY = np.iinfo(np.uint32).max  # signature slot of a document with no shingles
_SEPARATOR = "\x00"  # joins a batch's texts; never a word character


def tokenize_words(text: str) -> list[str]:
    """Lower-cased `\\w+` tokens: the words that shingles are made of (reference for `Shingler`)."""
    return re.findall(r"\w+", text.lower())


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised: a bijective mix that spreads every input bit."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@functools.cache
def _word_char_table() -> np.ndarray:
    """Read-only lookup: is code point c (< 0x10000) a `\\w` character? Built once per process (~20 ms)."""
    table = np.fromiter((chr(c).isalnum() or c == 0x5F for c in range(0x10000)), dtype=bool, count=0x10000)
    table.setflags(write=False)
    return table


class Shingler:
    """Hashes the word n-grams of a batch of texts in a few numpy passes. Small and picklable, so
    worker processes can receive it with each task."""

    def __init__(self, n_gram: int = 5):
        if n_gram < 1:
            raise ValueError(f"n_gram must be positive, got {n_gram}")
        self.n_gram = n_gram
        self._powers = np.ones(1, dtype=np.uint64)  # _CHAR_P ** i, grown to the longest word seen

    def _power_table(self, max_len: int) -> np.ndarray:
        if len(self._powers) <= max_len:
            powers = np.ones(max_len + 1, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for i in range(1, max_len + 1):
                    powers[i] = powers[i - 1] * _CHAR_P
            self._powers = powers
        return self._powers

    def batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of all texts: (x_S uint64, doc_S int64 index into texts, non-decreasing).

        Shingles repeat within a document when its n-grams repeat; MinHash does not care, and
        `shingle_set` dedups them for exact Jaccard.
        """
        if not texts:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        # the separator must not occur inside a text (a NUL there would shift every later document's index)
        joined = _SEPARATOR.join(t.replace(_SEPARATOR, " ") for t in texts).lower()
        c_C = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        table = _word_char_table()
        # Astral-plane characters (emoji, rare CJK) count as separators.
        is_word_C = table[np.minimum(c_C, 0xFFFF)] & (c_C < 0x10000)
        edges_C = np.diff(is_word_C.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
        start_W = np.flatnonzero(edges_C == 1)
        end_W = np.flatnonzero(edges_C == -1)
        len_W = end_W - start_W
        if len(len_W) == 0:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        doc_W = np.searchsorted(np.flatnonzero(c_C == 0), start_W)

        # Word hash: sum over the word's characters of (c + 1) * P ** (distance to the word's end).
        char_idx = np.flatnonzero(is_word_C)
        dist_to_end = np.repeat(end_W, len_W) - 1 - char_idx
        with np.errstate(over="ignore"):
            terms = (c_C[char_idx].astype(np.uint64) + np.uint64(1)) * self._power_table(int(len_W.max()))[dist_to_end]
            word_hash_W = splitmix64(np.add.reduceat(terms, np.cumsum(len_W) - len_W))

            n_words = len(word_hash_W)
            shingle_W = word_hash_W.copy()
            complete_W = np.ones(n_words, dtype=bool)  # the n-gram starting here stays inside its document
            for j in range(1, self.n_gram):
                same_doc = np.zeros(n_words, dtype=bool)
                m = max(n_words - j, 0)
                same_doc[:m] = doc_W[j:] == doc_W[:m]
                extend = np.flatnonzero(same_doc)
                shingle_W[extend] = shingle_W[extend] * _WORD_MIX + word_hash_W[extend + j]
                complete_W &= same_doc
        first_word = np.ones(n_words, dtype=bool)
        first_word[1:] = doc_W[1:] != doc_W[:-1]
        words_per_doc = np.bincount(doc_W, minlength=len(texts))
        keep = complete_W | (first_word & (words_per_doc[doc_W] < self.n_gram))
        return splitmix64(shingle_W[keep]), doc_W[keep]

    def shingle_set(self, text: str) -> np.ndarray:
        """Sorted unique shingle hashes of one text, for exact Jaccard."""
        return np.unique(self.batch([text])[0])


def jaccard(shingles_a: np.ndarray, shingles_b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique shingle arrays (0.0 when both are empty)."""
    union = len(np.union1d(shingles_a, shingles_b))
    if union == 0:
        return 0.0
    return len(np.intersect1d(shingles_a, shingles_b, assume_unique=True)) / union


class MinHasher:
    """MinHash signatures for batches of texts; the same seed, size and n-gram give the same bytes."""

    def __init__(
        self,
        num_perm: int = 128,
        n_gram: int = 5,
        seed: int = 1,
        batch_chars: int = 200_000,
        block_shingles: int = 4096,
    ):
        if num_perm < 1:
            raise ValueError(f"num_perm must be positive, got {num_perm}")
        self.num_perm = num_perm
        self.shingler = Shingler(n_gram)
        self.batch_chars = batch_chars
        self.block_shingles = block_shingles
        rng = np.random.Generator(np.random.PCG64(seed))
        self.a_K = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b_K = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(N, K) uint32 signatures. A text without words gets every slot at 2**32 - 1."""
        # Work in (K, N) / (K, S) layout: the min-reduction then runs along contiguous rows, which is
        # ~10x faster in numpy than reducing (S, K) blocks along axis 0.
        sig_KN = np.full((self.num_perm, len(texts)), _EMPTY, dtype=np.uint64)
        start = 0
        while start < len(texts):
            stop, chars = start, 0
            while stop < len(texts) and (stop == start or chars + len(texts[stop]) <= self.batch_chars):
                chars += len(texts[stop])
                stop += 1
            x_S, doc_S = self.shingler.batch(texts[start:stop])
            self._min_into(sig_KN, x_S, doc_S + start)
            start = stop
        return np.ascontiguousarray(sig_KN.T.astype(np.uint32))

    def _min_into(self, sig_KN: np.ndarray, x_S: np.ndarray, doc_S: np.ndarray) -> None:
        block_KS = np.empty((self.num_perm, self.block_shingles), dtype=np.uint64)
        a_K1, b_K1 = self.a_K[:, None], self.b_K[:, None]
        with np.errstate(over="ignore"):
            for s in range(0, len(x_S), self.block_shingles):
                x, doc = x_S[s : s + self.block_shingles], doc_S[s : s + self.block_shingles]
                h_KS = block_KS[:, : len(x)]
                np.multiply(a_K1, x[None, :], out=h_KS)
                h_KS += b_K1
                h_KS >>= np.uint64(32)
                seg_start = np.flatnonzero(np.diff(doc, prepend=-1))
                docs = doc[seg_start]  # unique within the block, so fancy assignment is safe
                sig_KN[:, docs] = np.minimum(sig_KN[:, docs], np.minimum.reduceat(h_KS, seg_start, axis=1))


def lsh_candidate_pairs(sig_NK: np.ndarray, bands: int, rows: int, max_bucket_pairs: int = 20) -> np.ndarray:
    """(P, 2) int64 unique pairs (i < j) of documents that agree on all `rows` slots of some band.

    A bucket of g <= max_bucket_pairs documents gives all its g*(g-1)/2 pairs; a larger bucket
    (templated pages) gives (first, other) and (i, i+1) only, which keeps the cost linear and still
    lets union-find connect the bucket. Documents without shingles are never candidates.
    """
    has_shingles = np.flatnonzero(has_shingles_N(sig_NK))
    keys_NB = band_keys(sig_NK[has_shingles], bands, rows)
    pairs = []
    for band in range(bands):
        key_N = keys_NB[:, band]
        order = np.argsort(key_N, kind="stable")
        key_sorted = key_N[order]
        group_start = np.flatnonzero(np.diff(key_sorted, prepend=key_sorted[:1] + np.uint64(1)))
        group_size = np.diff(group_start, append=len(order))
        doc_sorted = has_shingles[order]
        # Buckets of the same size g are handled together: an (n_buckets, g) matrix of members.
        for g in np.unique(group_size[(group_size > 1) & (group_size <= max_bucket_pairs)]).tolist():
            members = doc_sorted[group_start[group_size == g][:, None] + np.arange(g)[None, :]]
            i, j = np.triu_indices(g, k=1)
            pairs.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
        large = group_size > max_bucket_pairs
        for g_start, g_size in zip(group_start[large], group_size[large]):
            members = np.sort(doc_sorted[g_start : g_start + g_size])
            pairs.append(np.stack([np.full(g_size - 1, members[0]), members[1:]], axis=1))
            pairs.append(np.stack([members[:-1], members[1:]], axis=1))
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    pairs_P2 = np.sort(np.concatenate(pairs).astype(np.int64), axis=1)
    codes = np.unique(pairs_P2[:, 0] * len(sig_NK) + pairs_P2[:, 1])  # 1-D unique is much faster than axis=0
    return np.stack([codes // len(sig_NK), codes % len(sig_NK)], axis=1)


def has_shingles_N(sig_NK: np.ndarray) -> np.ndarray:
    """(N,) bool: the documents that have shingles (the others are never candidates)."""
    return (sig_NK != _EMPTY).any(axis=1)


def band_keys(sig_NK: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64: one hash per LSH band of each signature; two documents are candidates when they agree on
    the key of some band."""
    if bands * rows > sig_NK.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds the {sig_NK.shape[1]} permutations")
    keys_NB = np.zeros((len(sig_NK), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            band_NR = sig_NK[:, band * rows : (band + 1) * rows].astype(np.uint64)
            for r in range(rows):
                keys_NB[:, band] = splitmix64(keys_NB[:, band] * _WORD_MIX + band_NR[:, r])
    return keys_NB


def lsh_candidate_pairs_against(
    keys_new_MB: np.ndarray, keys_old_NB: np.ndarray, max_bucket_pairs: int = 20
) -> np.ndarray:
    """(P, 2) int64 unique (old, new) pairs of a new document and an indexed one that agree on some band's key; rows
    of documents without shingles must be left out by the caller. Like `lsh_candidate_pairs`, a bucket of more than
    max_bucket_pairs indexed documents pairs a new document with its first and last member only, which keeps the
    cost linear and still connects it to the bucket's cluster."""
    pairs = []
    for band in range(keys_old_NB.shape[1]):
        order = np.argsort(keys_old_NB[:, band], kind="stable")
        sorted_keys = keys_old_NB[order, band]
        lo = np.searchsorted(sorted_keys, keys_new_MB[:, band], side="left")
        hi = np.searchsorted(sorted_keys, keys_new_MB[:, band], side="right")
        count = hi - lo
        small = (count > 0) & (count <= max_bucket_pairs)
        new = np.repeat(np.flatnonzero(small), count[small])
        # positions lo..hi-1 of every small bucket, flattened
        starts = np.repeat(lo[small] - np.cumsum(count[small]) + count[small], count[small])
        pairs.append(np.stack([order[starts + np.arange(len(new))], new], axis=1))
        large = np.flatnonzero(count > max_bucket_pairs)
        for m in large:
            members = order[lo[m] : hi[m]]
            pairs.append(np.array([[members.min(), m], [members.max(), m]]))
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    pairs_P2 = np.concatenate(pairs).astype(np.int64)
    width = len(keys_new_MB) + 1
    codes = np.unique(pairs_P2[:, 0] * width + pairs_P2[:, 1])
    return np.stack([codes // width, codes % width], axis=1)


def estimated_jaccard(sig_NK: np.ndarray, pairs_P2: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """Share of equal signature slots for each pair: an unbiased estimate of their Jaccard similarity."""
    out_P = np.empty(len(pairs_P2), dtype=np.float64)
    for s in range(0, len(pairs_P2), chunk):
        p = pairs_P2[s : s + chunk]
        out_P[s : s + chunk] = (sig_NK[p[:, 0]] == sig_NK[p[:, 1]]).mean(axis=1)
    return out_P


def union_find_clusters(n: int, pairs_P2: np.ndarray) -> np.ndarray:
    """Cluster label of each of n items: the smallest index in its connected component."""
    parent = list(range(n))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for i, j in pairs_P2.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:  # the smaller index becomes the root: a root is always its component's minimum
            parent[max(ri, rj)] = min(ri, rj)
    return np.fromiter((find(x) for x in range(n)), dtype=np.int64, count=n)


def lsh_params_for_threshold(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows (B * R <= K) whose S-curve midpoint (1/B)**(1/R) sits ~0.1 below `threshold`.

    Candidates are verified against the threshold afterwards, so the S-curve is placed low to keep
    recall high (P[candidate | J = threshold] >= 0.98 for the defaults); precision comes from the
    verification.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    target = max(threshold - 0.1, 0.05)
    best = (0.0, num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        midpoint = (1.0 / bands) ** (1.0 / rows)
        if best[0] < midpoint <= target:
            best = (midpoint, bands, rows)
    return best[1], best[2]
