"""sample_corpus: an offline corpus of real text plus seeded, labelled synthetic documents.

CLI: python -m pipelines.sample_corpus --output sample.jsonl.gz [--n-documents N] [--seed S]
     [--preset debug_tiny|default|bench_near_dedup]

Real text is what every machine has once the project is installed, read as files (never imported):
1. the pydoc topics (`pydoc_data.topics`), source "python-docs", id `pydoc:<topic>`;
2. module, class and function docstrings of the standard library, parsed with `ast`, source
   "python-docs", id `stdlib:<module.qualname>`;
3. the long description of every `*.dist-info/METADATA` and the LICENSE*/COPYING* files of the
   dist-info folders in site-packages, sources "package-metadata" / "package-license";
4. only when 1-3 are too few (or when asked): docstrings of site-packages, source "package-docs".

These base documents are deduplicated against each other first (normalized-text equality, then
exact word-5-gram Jaccard >= `base_dedup_threshold`, candidates from MinHash LSH), so that the labels
of what is derived from them are exact. Derived documents carry their label in `metadata`:
- near-duplicates of a base, with their exact 5-gram Jaccard to it in a band per level (light
  [0.90, 1.0), medium [0.80, 0.90), heavy [0.50, 0.75): heavy ones are hard negatives at 0.8);
- exact duplicates: variants that `normalize_text` maps back to the base's normalized text;
- low-quality web junk of five kinds (spam, keyword lists, boilerplate, gibberish, templated pages).

Output: JSONL (gzip when the path ends in .gz), one `{"id", "text", "source", "metadata"}` per line,
written atomically and deterministically: the same config on the same machine gives the same bytes.
Every random choice comes from a `random.Random` seeded with the config's seed and what is being
drawn (e.g. "0:near:17"), so items do not depend on each other's draws. The whole corpus is held in
memory (100k documents are ~200 MB of text): it is shuffled before it is written.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import sysconfig
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from pipelines.document import Document
from pipelines.minhash import MinHasher, Shingler, jaccard, lsh_candidate_pairs, lsh_params_for_threshold
from pipelines.parallel import batched, default_workers, ordered_map
from pipelines.progress import track
from pipelines.stage import atomic_path
from pipelines.text import normalize_text

# Target Jaccard band [low, high) with the base, per near-duplicate level.
NEAR_DUPLICATE_BANDS = MappingProxyType({"light": (0.90, 1.0), "medium": (0.80, 0.90), "heavy": (0.50, 0.75)})
LOW_QUALITY_KINDS = ("spam", "keyword_list", "boilerplate", "gibberish", "templated")
EXACT_DUPLICATE_VARIANTS = ("identical", "whitespace", "nfd", "mojibake")
_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING")
_NUM_PERM = 128
_FILES_PER_TASK = 32


@dataclass(kw_only=True, slots=True)
class SampleCorpusConfig:
    """What `build_sample_corpus` makes. Counts are rounded from fractions; bases take the rest."""

    n_documents: int = 3000
    """Total records written, exactly (bases + near-duplicates + exact duplicates + low-quality)."""
    seed: int = 0
    """Seeds every random choice; the same config on the same machine gives the same bytes."""
    near_duplicate_fraction: float = 0.15
    """Share of records that are near-duplicates of a base document."""
    exact_duplicate_fraction: float = 0.03
    """Share of records that are exact duplicates (after `normalize_text`) of a base document."""
    low_quality_fraction: float = 0.15
    """Share of records that are synthetic low-quality web junk, split evenly over the five kinds."""
    near_duplicate_levels: tuple[tuple[str, float], ...] = (("light", 0.45), ("medium", 0.35), ("heavy", 0.20))
    """Mix of near-duplicate levels as (level, weight) pairs (a dict is accepted); see NEAR_DUPLICATE_BANDS."""
    min_words: int = 20
    """A real document (docstring, metadata, license, topic) needs at least this many words."""
    min_near_dup_words: int = 50
    """Only base documents with at least this many words get near-duplicates."""
    base_dedup_threshold: float = 0.5
    """A base document is dropped when its word-5-gram Jaccard with an earlier kept one reaches this."""
    max_base_chars: int = 20_000
    """Longer real documents are cut at the last paragraph (else line, else word) boundary before this."""
    include_package_docs: bool | None = None
    """Read site-packages docstrings: None = only when sources 1-3 give too few base documents."""

    def __post_init__(self) -> None:
        if isinstance(self.near_duplicate_levels, Mapping):
            self.near_duplicate_levels = tuple(self.near_duplicate_levels.items())
        self.near_duplicate_levels = tuple((str(k), float(w)) for k, w in self.near_duplicate_levels)
        if self.n_documents < 1:
            raise ValueError(f"n_documents must be positive, got {self.n_documents}")
        fractions = {
            "near_duplicate_fraction": self.near_duplicate_fraction,
            "exact_duplicate_fraction": self.exact_duplicate_fraction,
            "low_quality_fraction": self.low_quality_fraction,
        }
        for name, value in fractions.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if sum(fractions.values()) >= 1.0:
            listed = " + ".join(f"{name} ({value})" for name, value in fractions.items())
            raise ValueError(f"{listed} = {sum(fractions.values()):g} must be below 1 to leave room for bases")
        unknown = sorted({k for k, _ in self.near_duplicate_levels} - set(NEAR_DUPLICATE_BANDS))
        if unknown:
            raise ValueError(f"near_duplicate_levels has unknown levels {unknown}; known: {list(NEAR_DUPLICATE_BANDS)}")
        if len({k for k, _ in self.near_duplicate_levels}) != len(self.near_duplicate_levels):
            raise ValueError(f"near_duplicate_levels repeats a level: {self.near_duplicate_levels}")
        weights = [w for _, w in self.near_duplicate_levels]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"near_duplicate_levels weights must be >= 0 with a positive sum, got {weights}")
        if self.min_words < 1 or self.min_near_dup_words < 1:
            raise ValueError(
                f"min_words and min_near_dup_words must be positive, got {self.min_words}, {self.min_near_dup_words}"
            )
        if not 0.0 < self.base_dedup_threshold <= 1.0:
            raise ValueError(f"base_dedup_threshold must be in (0, 1], got {self.base_dedup_threshold}")
        if self.max_base_chars < 100:
            raise ValueError(f"max_base_chars must be at least 100, got {self.max_base_chars}")


def debug_tiny() -> SampleCorpusConfig:
    """About 300 documents with every label present: what the tests build."""
    return SampleCorpusConfig(n_documents=300)


def default() -> SampleCorpusConfig:
    return SampleCorpusConfig()


def bench_near_dedup(n_documents: int = 50_000) -> SampleCorpusConfig:
    """Bases and their near-duplicates only (half each), for the near-dedup benchmark."""
    return SampleCorpusConfig(
        n_documents=n_documents, near_duplicate_fraction=0.5, exact_duplicate_fraction=0.0, low_quality_fraction=0.0
    )


PRESETS: Mapping[str, Callable[[], SampleCorpusConfig]] = MappingProxyType(
    {"debug_tiny": debug_tiny, "default": default, "bench_near_dedup": bench_near_dedup}
)


@dataclass(kw_only=True, slots=True)
class SampleCorpusStats:
    """What a build wrote, and how many real documents were available and dropped as duplicates."""

    output_path: str
    n_documents: int
    n_bases: int
    n_bases_available: int  # real documents left after base dedup, from the sources read
    n_bases_dropped_exact: int
    n_bases_dropped_near: int
    used_package_docs: bool
    n_extra_near_duplicates: int  # near-duplicates made in place of bases this machine does not have
    n_by_source: dict[str, int] = field(default_factory=dict)
    n_by_low_quality_kind: dict[str, int] = field(default_factory=dict)
    n_by_near_duplicate_level: dict[str, int] = field(default_factory=dict)
    n_by_exact_duplicate_variant: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Base:
    id: str
    source: str
    text: str
    digest: bytes  # of normalize_text(text): equal digests are exact duplicates


# ---------------------------------------------------------------------------------------------
# Reading the real sources
# ---------------------------------------------------------------------------------------------


def _prepare(text: str, min_words: int, max_chars: int) -> str | None:
    """Strip, cut at a paragraph boundary below max_chars; None when too short or not encodable."""
    text = text.replace("\x00", "").strip()  # NUL separates texts inside Shingler.batch
    if len(text) > max_chars:
        cut = max(text.rfind("\n\n", 0, max_chars), 0) or max(text.rfind("\n", 0, max_chars), 0)
        cut = cut or max(text.rfind(" ", 0, max_chars), 0) or max_chars
        text = text[:cut].rstrip()
    if len(text.split()) < min_words:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\udcxx" escape in a docstring
        return None
    return text


def _digest(text: str) -> bytes:
    return hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=16).digest()


def _docstrings(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(qualname, docstring) of the module, its classes and functions (nested ones too), in file order.

    Only statements are visited (not expressions), which is what keeps this cheap on big files.
    """
    out = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        out.append((module, doc))

    def visit(nodes: list[ast.AST], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = prefix + node.name
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    out.append((qualname, doc))
                is_function = not isinstance(node, ast.ClassDef)
                visit(node.body, qualname + (".<locals>." if is_function else "."))
            else:
                visit([c for c in ast.iter_child_nodes(node) if isinstance(c, _BLOCK_NODES)], prefix)

    visit(tree.body, module + ".")
    return out


_BLOCK_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


def _read_docstring_files(task: tuple[list[tuple[str, str]], str, int, int]) -> list[tuple[str, str, bytes]]:
    """Worker: (id, text, digest) of the docstrings in a batch of (path, module) files."""
    files, prefix, min_words, max_chars = task
    out = []
    for path, module in files:
        try:
            tree = ast.parse(Path(path).read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        for qualname, doc in _docstrings(tree, module):
            text = _prepare(doc, min_words, max_chars)
            if text is not None:
                out.append((f"{prefix}:{qualname}", text, _digest(text)))
    return out


def _python_files(root: str) -> list[tuple[str, str]]:
    """(path, dotted module name) of the .py files under root, sorted, skipping _SKIP_DIRS."""
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith((".dist-info", ".egg-info")))
        rel = Path(folder).relative_to(root).parts
        for name in sorted(names):
            if name.endswith(".py"):
                stem = name[:-3]
                out.append((os.path.join(folder, name), ".".join(rel if stem == "__init__" else (*rel, stem))))
    return out


def _read_docstrings(root: str, prefix: str, source: str, config: SampleCorpusConfig) -> list[_Base]:
    files = _python_files(root)
    tasks = [(batch, prefix, config.min_words, config.max_base_chars) for batch in batched(files, _FILES_PER_TASK)]
    results = ordered_map(_read_docstring_files, tasks, lambda t: t, default_workers())
    found = track(results, desc=f"reading {prefix} docstrings", total=len(tasks), unit="batch")
    return [_Base(doc_id, source, text, digest) for _, docs in found for doc_id, text, digest in docs]


def _read_pydoc_topics(config: SampleCorpusConfig) -> list[_Base]:
    from pydoc_data.topics import topics  # a data module of the standard library: a dict of strings

    out = []
    for topic in sorted(topics):
        text = _prepare(topics[topic], config.min_words, config.max_base_chars)
        if text is not None:
            out.append(_Base(f"pydoc:{topic}", "python-docs", text, _digest(text)))
    return out


def _read_package_metadata(site_packages: str, config: SampleCorpusConfig) -> list[_Base]:
    """Long descriptions (METADATA body after the headers) and license files of every dist-info."""
    out = []
    for dist_info in sorted(Path(site_packages).glob("*.dist-info")):
        name = dist_info.name.split("-")[0]
        metadata = dist_info / "METADATA"
        if metadata.is_file():
            raw = metadata.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            _, _, body = raw.partition("\n\n")
            text = _prepare(body, config.min_words, config.max_base_chars)
            if text is not None:
                out.append(_Base(f"dist:{name}:METADATA", "package-metadata", text, _digest(text)))
        licenses = (p for p in dist_info.rglob("*") if p.name.upper().startswith(_LICENSE_PREFIXES) and p.is_file())
        for path in sorted(licenses):
            raw = path.read_text(encoding="utf-8", errors="replace")
            text = _prepare(raw, config.min_words, config.max_base_chars)
            if text is not None:
                rel = path.relative_to(dist_info).as_posix()
                out.append(_Base(f"dist:{name}:{rel}", "package-license", text, _digest(text)))
    return out


# ---------------------------------------------------------------------------------------------
# Base dedup
# ---------------------------------------------------------------------------------------------


def _unique_shingles(shingler: Shingler, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(x_S, doc_S) sorted by (doc, hash), each document's hashes unique: a batched `shingle_set`."""
    x_S, doc_S = shingler.batch(texts)
    order = np.lexsort((x_S, doc_S))
    x_S, doc_S = x_S[order], doc_S[order]
    first = np.ones(len(x_S), dtype=bool)
    first[1:] = (x_S[1:] != x_S[:-1]) | (doc_S[1:] != doc_S[:-1])
    return x_S[first], doc_S[first]


def _shingle_sets(shingler: Shingler, texts: list[str], batch_chars: int = 200_000) -> list[np.ndarray]:
    """`shingler.shingle_set(text)` for each text, in batches of about batch_chars characters."""
    out: list[np.ndarray] = []
    start = 0
    while start < len(texts):
        stop, chars = start, 0
        while stop < len(texts) and (stop == start or chars + len(texts[stop]) <= batch_chars):
            chars += len(texts[stop])
            stop += 1
        x_S, doc_S = _unique_shingles(shingler, texts[start:stop])
        bounds = np.searchsorted(doc_S, np.arange(stop - start + 1))
        out.extend(x_S[bounds[k] : bounds[k + 1]] for k in range(stop - start))
        start = stop
    return out


def _jaccards_to(shingler: Shingler, base_set: np.ndarray, texts: list[str]) -> list[float]:
    """`jaccard(base_set, shingler.shingle_set(t))` for each text, from one batch (the same floats:
    |A n B| / (|A| + |B| - |A n B|) with the same integers)."""
    x_S, doc_S = _unique_shingles(shingler, texts)
    size_N = np.bincount(doc_S, minlength=len(texts))
    inter_N = np.bincount(doc_S[np.isin(x_S, base_set)], minlength=len(texts))
    union_N = len(base_set) + size_N - inter_N
    return [i / u if u else 0.0 for i, u in zip(inter_N.tolist(), union_N.tolist())]


def _unique_ids(bases: list[_Base]) -> list[_Base]:
    """The first base of each id: a name defined twice (if/else branches), two installs of a package."""
    seen: set[str] = set()
    out = []
    for base in bases:
        if base.id not in seen:
            seen.add(base.id)
            out.append(base)
    return out


def _dedup_bases(bases: list[_Base], threshold: float) -> tuple[list[_Base], int, int]:
    """Drop a base whose normalized text equals an earlier one's, or whose exact 5-gram Jaccard with
    an earlier kept base is >= threshold. Returns (kept, n_dropped_exact, n_dropped_near).

    Candidates come from MinHash LSH and are verified exactly. Processing pairs in order of their
    later member means every earlier member's fate is settled when it is consulted. LSH caps large
    buckets at linear pairs, so the pass repeats on the survivors until it drops nothing.
    """
    seen: set[bytes] = set()
    unique = []
    for base in bases:
        if base.digest not in seen:
            seen.add(base.digest)
            unique.append(base)
    texts = [b.text for b in unique]
    sig_NK = MinHasher(num_perm=_NUM_PERM).signatures(texts)
    bands, rows = lsh_params_for_threshold(threshold, _NUM_PERM)
    shingler = Shingler()
    sets: dict[int, np.ndarray] = {}
    keep_N = np.ones(len(unique), dtype=bool)
    while True:
        alive = np.flatnonzero(keep_N)
        pairs_P2 = alive[lsh_candidate_pairs(sig_NK[alive], bands, rows)]
        pairs_P2 = pairs_P2[np.lexsort((pairs_P2[:, 0], pairs_P2[:, 1]))]
        missing = sorted(set(np.unique(pairs_P2).tolist()) - sets.keys())
        sets.update(zip(missing, _shingle_sets(shingler, [texts[i] for i in missing])))
        n_dropped = 0
        for i, j in pairs_P2.tolist():
            if keep_N[i] and keep_N[j] and jaccard(sets[i], sets[j]) >= threshold:
                keep_N[j] = False
                n_dropped += 1
        if n_dropped == 0:
            break
    kept = [b for b, k in zip(unique, keep_N.tolist()) if k]
    return kept, len(bases) - len(unique), len(unique) - len(kept)


# ---------------------------------------------------------------------------------------------
# Near-duplicates
# ---------------------------------------------------------------------------------------------

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_AUTHORS = ("admin", "editor", "J. Smith", "Maria Garcia", "the team", "guest author", "webmaster", "A. Chen")
_SITES = ("docs-mirror.net", "devnotes.io", "codewiki.org", "pyhelp.info", "techarchive.com", "readthedocs-mirror.xyz")
_COMPANIES = ("Acme Corp", "BestDeals Ltd", "MegaMart", "ShopNow Inc", "TopChoice", "PrimeGoods", "ValueHub",
              "QuickBuy", "SuperSaver", "EliteStore", "Northwind", "Globex")  # fmt: skip
_EDIT_WEIGHTS = (("substitute", 0.45), ("insert", 0.2), ("delete", 0.2), ("reorder", 0.05))
_TOKEN_RE = re.compile(r"\s*\S+")
_WORD_PARTS_RE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def _header_line(rng: random.Random) -> str:
    date = f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(2008, 2024)}"
    return rng.choice((
        f"Posted on {date} by {rng.choice(_AUTHORS)}",
        f"Last updated: {date}",
        f"Originally published at {rng.choice(_SITES)}",
        f"Reading time: {rng.randint(2, 15)} minutes",
        f"Home > Docs > {rng.choice(_SITES).split('.')[0].title()}",
        "Skip to main content",
    ))  # fmt: skip


def _footer_line(rng: random.Random, vocab: list[str]) -> str:
    return rng.choice((
        "Share this page",
        "Share this page: Facebook | Twitter | Email",
        f"Copyright © {rng.randint(2008, 2024)} {rng.choice(_COMPANIES)}. All rights reserved.",
        "Was this page helpful? Yes No",
        f"Tags: {', '.join(rng.sample(vocab, 3))}",
        "Back to top",
        "Comments are closed.",
    ))  # fmt: skip


def _with_ws(ws: str, token: str) -> str:
    return ws + token.lstrip()


def _leading_ws(token: str) -> str:
    return token[: len(token) - len(token.lstrip())]


def _apply_edit(tokens: list[str], edit: tuple[str, float, float, str]) -> bool:
    """Apply one edit in place to a list of tokens (leading white space + a word); False if a no-op.

    Positions are fractions of the current length, so any prefix of an edit sequence applies.
    """
    kind, a, b, payload = edit
    n = len(tokens)
    if kind == "substitute":
        i = min(int(a * n), n - 1)
        ws, word = _leading_ws(tokens[i]), tokens[i].lstrip()
        pre, core, post = _WORD_PARTS_RE.match(word).groups()
        if not core or core.lower() == payload:
            return False
        new = payload.title() if core[:1].isupper() else payload
        tokens[i] = ws + pre + new + post
    elif kind == "insert":
        i = min(int(a * n), n - 1)
        ws = _leading_ws(tokens[i])
        tokens[i] = _with_ws(" ", tokens[i])
        tokens.insert(i, ws + payload)
    elif kind == "delete":
        if n <= 5:
            return False
        i = min(int(a * n), n - 1)
        removed = tokens.pop(i)
        if i < len(tokens) and "\n" not in _leading_ws(tokens[i]):  # keep line and paragraph breaks
            tokens[i] = _with_ws(_leading_ws(removed), tokens[i])
    elif kind == "reorder":
        starts = [0] + [k for k in range(1, n) if _leading_ws(tokens[k]).count("\n") >= 2]
        m = len(starts)
        if m < 2:
            return False
        i = min(int(a * m), m - 1)
        i, j = sorted((i, (i + 1 + min(int(b * (m - 1)), m - 2)) % m))  # two different paragraphs
        bounds = [*starts, n]
        paragraphs = [tokens[bounds[k] : bounds[k + 1]] for k in range(len(starts))]
        separators = [_leading_ws(p[0]) for p in paragraphs]
        paragraphs[i], paragraphs[j] = paragraphs[j], paragraphs[i]
        tokens[:] = [t for sep, p in zip(separators, paragraphs) for t in (_with_ws(sep, p[0]), *p[1:])]
    elif kind == "header":
        line = _TOKEN_RE.findall(payload)
        tokens[:] = [*line, _with_ws("\n\n", tokens[0]), *tokens[1:]]
    elif kind == "footer":
        line = _TOKEN_RE.findall(payload)
        tokens.extend([_with_ws("\n\n", line[0]), *line[1:]])
    else:
        raise AssertionError(kind)
    return True


def _edit_sequence(rng: random.Random, n_edits: int, vocab: list[str]) -> list[tuple[str, float, float, str]]:
    kinds, weights = zip(*_EDIT_WEIGHTS)
    edits = [(kind, rng.random(), rng.random(), rng.choice(vocab)) for kind in rng.choices(kinds, weights, k=n_edits)]
    for kind, line in (("header", _header_line(rng)), ("footer", _footer_line(rng, vocab))):
        if rng.random() < 0.5:
            edits.insert(rng.randrange(len(edits) + 1), (kind, 0.0, 0.0, line))
    return edits


def _near_duplicate(
    base_text: str, base_set: np.ndarray, level: str, rng: random.Random, vocab: list[str], shingler: Shingler
) -> tuple[str, str, float] | None:
    """(text, edits applied, exact Jaccard) with the Jaccard in the level's band, or None.

    The Jaccard J(k) with the base falls (roughly monotonically) with the number k of edits applied
    from a random sequence. A word edit replaces ~n = 5 of the S base shingles, so
    J(k) ~ (S - 5k) / (S + 5k), i.e. k* ~ S (1 - J) / (5 (1 + J)) for a target J drawn inside the
    band. The first round measures k around k*, later ones bisect (lo, hi) with J(lo) >= target >
    J(hi) in 8 steps; it stops once some measured k lands in the band, picking the closest to target.
    """
    low, high = NEAR_DUPLICATE_BANDS[level]
    target = rng.uniform(low, min(high, 0.99))
    base_tokens = _TOKEN_RE.findall(base_text)
    n_edits = math.ceil(len(base_tokens) * (1 - low) / 2) + 4  # reaches J(k) = low with a ~2x margin
    edits = _edit_sequence(rng, n_edits, vocab)
    k_star = len(base_set) * (1 - target) / (5 * (1 + target))
    ks = {max(1, round(k_star * f)) for f in (0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)}
    evaluated: dict[int, tuple[float, str, frozenset[str]]] = {}  # k -> (J, text, kinds that took effect)
    lo = (0, base_tokens, frozenset())  # the largest k known to give J >= target, its tokens and kinds
    hi_k = len(edits) + 1  # the smallest k known to give J < target (or past the end)
    while hi_k - lo[0] > 1:
        bisect = {round(lo[0] + (hi_k - lo[0]) * s / 9) for s in range(1, 9)}
        ks = sorted(k for k in ks if lo[0] < k < hi_k) or sorted(k for k in bisect if lo[0] < k < hi_k)
        k, tokens, kinds = lo[0], list(lo[1]), set(lo[2])
        snapshots = []
        for next_k in ks:
            for edit in edits[k:next_k]:
                if _apply_edit(tokens, edit):
                    kinds.add(edit[0])
            k = next_k
            snapshots.append((k, list(tokens), frozenset(kinds)))
        texts = ["".join(t) for _, t, _ in snapshots]
        for (k, tokens, kinds), text, j in zip(snapshots, texts, _jaccards_to(shingler, base_set, texts)):
            evaluated[k] = (j, text, kinds)
            if j >= target and k > lo[0] and k < hi_k:
                lo = (k, tokens, kinds)
            elif j < target:
                hi_k = min(hi_k, k)
        if any(low <= round(j, 4) < high for j, _, _ in evaluated.values()):
            break
        ks = set()  # the next rounds bisect
    in_band = [(abs(j - target), k) for k, (j, _, _) in evaluated.items() if low <= round(j, 4) < high]
    if not in_band:
        return None
    j, text, kinds = evaluated[min(in_band)[1]]
    return text, ",".join(kind for kind in ("header", "footer", *dict(_EDIT_WEIGHTS)) if kind in kinds), j


# ---------------------------------------------------------------------------------------------
# Exact duplicates
# ---------------------------------------------------------------------------------------------


def _exact_variant(text: str, variant: str, rng: random.Random) -> str | None:
    if variant == "identical":
        return text
    if variant == "nfd":
        return unicodedata.normalize("NFD", text)
    if variant == "mojibake":  # UTF-8 bytes read as Windows-1252, which ftfy repairs
        try:
            return text.encode("utf-8").decode("cp1252")
        except UnicodeDecodeError:
            return None
    assert variant == "whitespace", variant
    lines = text.split("\n")
    for i in rng.sample(range(len(lines)), k=max(1, len(lines) // 3)):  # doubled and trailing spaces
        lines[i] = lines[i].replace(" ", "  ", rng.randint(1, 3)) + " " * rng.randint(1, 4)
    out = "\n".join(lines)
    if rng.random() < 0.3:  # three newlines normalize back to two
        out = out.replace("\n\n", "\n\n\n")
    if rng.random() < 0.5:
        out = out.replace("\n", "\r\n")
    if rng.random() < 0.5:
        out = "  " + out + "\n\n"
    return out


def _exact_duplicate(bases: list[_Base], non_ascii: list[int], rng: random.Random) -> tuple[int, str, str]:
    """(base index, variant, text): a variant that differs from the base text (unless "identical")
    and normalizes to the base's normalized text; variants that cannot be made fall back in order."""
    variant = rng.choice(EXACT_DUPLICATE_VARIANTS)
    for candidate in (variant, "whitespace", "identical"):
        pool = non_ascii if candidate in ("nfd", "mojibake") else range(len(bases))
        for _ in range(min(10, len(pool))):
            b = rng.choice(pool)
            text = _exact_variant(bases[b].text, candidate, rng)
            if text is None or (candidate != "identical" and text == bases[b].text):
                continue
            if candidate == "identical" or _digest(text) == bases[b].digest:
                return b, candidate, text
    raise AssertionError("an identical copy always normalizes like its base")


# ---------------------------------------------------------------------------------------------
# Low-quality documents
# ---------------------------------------------------------------------------------------------

_PRODUCTS = ("running shoes", "wireless earbuds", "phone case", "vitamin c serum", "gaming laptop", "office chair",
             "coffee maker", "yoga mat", "smart watch", "led bulbs", "air fryer", "car insurance", "payday loans",
             "weight loss pills", "hotel deals", "web hosting", "seo services", "crypto wallet", "dental implants",
             "used cars", "cheap flights", "protein powder", "solar panels", "mattress")  # fmt: skip
_CITIES = ("London", "Paris", "Berlin", "Madrid", "Chicago", "Houston", "Toronto", "Sydney", "Mumbai", "Lagos",
           "Austin", "Denver", "Lyon", "Munich", "Osaka", "Seattle", "Dublin", "Manchester", "Phoenix",
           "Boston")  # fmt: skip
_SHOUTS = ("BUY NOW", "LIMITED TIME OFFER", "ACT NOW", "100% FREE", "CLICK HERE", "DON'T MISS OUT",
           "BEST PRICE GUARANTEED", "ORDER TODAY", "FREE SHIPPING", "MONEY BACK GUARANTEE", "WIN BIG",
           "EXCLUSIVE DEAL", "CALL NOW", "NO CREDIT CHECK", "LOWEST PRICES ONLINE", "AMAZING RESULTS")  # fmt: skip
_TLDS = ("com", "net", "biz", "info", "xyz", "top", "online", "shop")
_KEYWORD_MODIFIERS = ("best", "cheap", "buy", "free", "top", "discount", "online", "near me", "2024", "reviews",
                      "deals", "sale", "for sale", "price", "official", "coupon")  # fmt: skip
_NAV = ("Home", "About Us", "Products", "Services", "Blog", "Contact", "FAQ", "Shop", "News", "Careers", "Support",
        "Pricing", "Login", "Register", "Cart", "Sitemap")  # fmt: skip


def _price(rng: random.Random) -> str:
    return f"${rng.randint(1, 999)}.{rng.choice(('99', '95', '00', '49'))}"


def _url(rng: random.Random, vocab: list[str]) -> str:
    host = f"www.{rng.choice(vocab)}-{rng.choice(vocab)}.{rng.choice(_TLDS)}"
    return f"http://{host}/{rng.choice(vocab)}?ref={rng.randint(100, 99999)}"


def _phone(rng: random.Random) -> str:
    return f"1-800-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"


def _spam_piece(rng: random.Random, vocab: list[str]) -> str:
    product = rng.choice(_PRODUCTS)
    return rng.choice((
        f"{rng.choice(_SHOUTS)}!!! {product.upper()} FOR ONLY {_price(rng)}!!!",
        f"Click here: {_url(rng, vocab)}",
        f"Get {rng.choice((50, 70, 80, 90))}% OFF {product} today only!!! {rng.choice(_SHOUTS)}!",
        f"{rng.choice(vocab).upper()} {rng.choice(vocab).upper()} {rng.choice(_SHOUTS)}!!",
        f"Visit {_url(rng, vocab)} now and claim your FREE {product}!!!",
        f"CALL {_phone(rng)} NOW!!! Operators are standing by!",
        f"You have been selected to WIN a {product}! {rng.choice(_SHOUTS)}!!! {_url(rng, vocab)}",
        f"Doctors HATE this {rng.choice(vocab)} trick!!! {product.title()} from {_price(rng)}. CLICK HERE!!!",
    ))  # fmt: skip


def _keyword_list(rng: random.Random, vocab: list[str], n_words: int) -> str:
    """Keyword stuffing: a few keywords, each with SEO modifiers, in one list style per page."""
    items: list[str] = []
    while sum(len(item.split()) for item in items) < n_words:
        keyword = rng.choice((rng.choice(_PRODUCTS), rng.choice(vocab), f"{rng.choice(vocab)} {rng.choice(_PRODUCTS)}"))
        for modifier in rng.sample(_KEYWORD_MODIFIERS, rng.randint(3, 7)):
            items.append(f"{modifier} {keyword}" if rng.random() < 0.6 else f"{keyword} {modifier}")
        if rng.random() < 0.3:
            items.append(f"{keyword} {rng.choice(_CITIES).lower()}")
    text = rng.choice((", ", ",\n", "\n", " | ", " ")).join(items)
    return rng.choice(("", "", "Tags: ", "Keywords: ", "Related searches:\n")) + text


def _boilerplate_piece(rng: random.Random, vocab: list[str]) -> str:
    company = rng.choice(_COMPANIES)
    return rng.choice((
        "We use cookies to improve your experience on our website. By continuing to browse, you agree to our use "
        "of cookies. Accept all cookies | Manage preferences | Reject",
        " | ".join(rng.sample(_NAV, rng.randint(4, 8))),
        f"© {rng.randint(2005, 2024)} {company}. All rights reserved.",
        "Log in to your account. Username Password Remember me. Forgot your password? Don't have an account? Sign up",
        "Subscribe to our newsletter to receive the latest news and exclusive offers. Enter your email address. "
        "Subscribe",
        "Privacy Policy | Terms of Service | Cookie Settings | Accessibility | Sitemap",
        "Follow us on Facebook Twitter Instagram LinkedIn YouTube",
        "Please enable JavaScript to view this page. Skip to main content. Loading...",
        f"Home > {rng.choice(vocab).title()} > {rng.choice(vocab).title()}",
        f"Categories: {', '.join(w.title() for w in rng.sample(vocab, rng.randint(3, 6)))}",
        "This site is protected by reCAPTCHA and the Google Privacy Policy and Terms of Service apply.",
        f"Questions? Contact {company} customer support at support@{company.split()[0].lower()}.com",
        "Page not found. The page you are looking for might have been removed, had its name changed, or is "
        "temporarily unavailable. Return to homepage.",
    ))  # fmt: skip


def _gibberish_piece(rng: random.Random, vocab: list[str]) -> str:
    words = []
    for _ in range(rng.randint(4, 14)):
        roll = rng.random()
        if roll < 0.45:  # a real word with its letters shuffled
            chars = list(rng.choice(vocab))
            rng.shuffle(chars)
            words.append("".join(chars))
        elif roll < 0.9:  # a random letter string
            words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 12))))
        else:  # keyboard mash and symbols
            words.append("".join(rng.choice("asdfjkl;qwerzxcv0123456789#@$%&*") for _ in range(rng.randint(3, 9))))
    return " ".join(words) + rng.choice((".", "", " ..."))


def _templated_page(rng: random.Random, vocab: list[str], n_words: int) -> str:
    """One of a few fixed page templates, filled with different products, cities and numbers."""
    product, city, company = rng.choice(_PRODUCTS), rng.choice(_CITIES), rng.choice(_COMPANIES)
    template = rng.randrange(3)
    if template == 0:
        head = (
            f"Best {product.title()} in {city} | {company}\n\nLooking for the best {product} in {city}? "
            f"{company} offers {rng.randint(5, 500)} {product} options starting at {_price(rng)}. Our {city} "
            f"team has served {rng.randint(100, 90000)} happy customers since {rng.randint(1990, 2020)}.\n"
        )

        def row() -> str:
            return (
                f"- {product.title()} {rng.choice(vocab).title()} {rng.randint(100, 999)}: {_price(rng)}, "
                f"rated {rng.randint(1, 5)}/5 by {rng.randint(3, 900)} customers in {city}"
            )

        tail = f"\nCall {_phone(rng)} or visit our {city} store at {rng.randint(1, 999)} Main Street."
    elif template == 1:
        head = (
            f"{company} {product.title()} {rng.choice(vocab).title()} - Buy Online\n\nPrice: {_price(rng)}\n"
            f"In stock: {rng.randint(1, 99)} units\nShips from: {city}\nRating: {rng.randint(1, 5)} out of 5 "
            f"({rng.randint(1, 999)} reviews)\n\nFeatures:\n"
        )

        def row() -> str:
            return f"* {rng.choice(vocab).title()} {rng.choice(vocab)} {rng.choice(vocab)} for {product}"

        tail = f"\nCustomers who bought this {product} also bought: {rng.choice(_PRODUCTS)}, {rng.choice(_PRODUCTS)}."
    else:
        head = (
            f"Weather in {city} today: {rng.randint(-10, 38)}°C, {rng.choice(('sunny', 'cloudy', 'rain'))}. "
            f"Wind {rng.randint(0, 60)} km/h. Humidity {rng.randint(10, 100)}%.\n\n{city} 10-day forecast:\n"
        )

        def row() -> str:
            return (
                f"{rng.choice(('Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'))} {rng.randint(1, 28)}: "
                f"high {rng.randint(0, 40)}°C, low {rng.randint(-15, 20)}°C, "
                f"{rng.choice(('sunny', 'cloudy', 'showers', 'storms', 'snow'))}"
            )

        tail = f"\nSee also: weather in {rng.choice(_CITIES)}, weather in {rng.choice(_CITIES)}."
    lines = [head]
    while len(" ".join(lines).split()) + len(tail.split()) < n_words:
        lines.append(row())
    return "\n".join(lines) + "\n" + tail


_LOW_QUALITY_PIECES = MappingProxyType({
    "spam": (_spam_piece, (" ", "\n", "\n\n")),
    "boilerplate": (_boilerplate_piece, ("\n", "\n\n", " ")),
    "gibberish": (_gibberish_piece, (" ", "\n")),
})  # fmt: skip


def low_quality_page(kind: str, rng: random.Random, vocab: list[str]) -> str:
    """A junk page of 30-400 words (log-uniform length)."""
    n_words = int(math.exp(rng.uniform(math.log(30), math.log(380))))
    if kind == "templated":
        text = _templated_page(rng, vocab, n_words)
    elif kind == "keyword_list":
        text = _keyword_list(rng, vocab, n_words)
    else:
        make, joiners = _LOW_QUALITY_PIECES[kind]
        pieces, count = [], 0
        while count < n_words:
            piece = make(rng, vocab)
            pieces.append(piece)
            count += len(piece.split())
        text = "".join(p + rng.choice(joiners) for p in pieces).strip()
    words = list(re.finditer(r"\S+", text))
    if len(words) > 400:  # only the last piece or row can overshoot: cut after the 400th word
        text = text[: words[399].end()]
    return text


def vocabulary(texts: list[str], min_count: int = 3) -> list[str]:
    """Lower-case words (4-12 letters) seen at least min_count times in the texts, sorted: what the junk
    generators (low_quality_page) draw their words from."""
    counts = Counter(w.lower() for t in texts for w in re.findall(r"\b[A-Za-z]{4,12}\b", t))
    return sorted(w for w, c in counts.items() if c >= min_count)


def _vocabulary(bases: list[_Base], rng: random.Random, max_bases: int = 2000) -> list[str]:
    """The vocabulary of a sample of the base texts."""
    vocab = vocabulary([b.text for b in rng.sample(bases, min(max_bases, len(bases)))])
    assert len(vocab) >= 10, "the base texts give too small a vocabulary"
    return vocab


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


def _split(total: int, weights: list[float]) -> list[int]:
    """Integer counts proportional to weights that sum to total (largest remainder, ties by order)."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _read_base_documents(config: SampleCorpusConfig, n_needed: int) -> tuple[list[_Base], int, int, bool]:
    """Deduplicated real documents from sources 1-3, plus 4 when asked or when 1-3 are fewer than
    n_needed. Returns (bases, n_dropped_exact, n_dropped_near, package docs used)."""
    paths = sysconfig.get_paths()
    pool = _read_pydoc_topics(config)
    pool += _read_docstrings(paths["stdlib"], "stdlib", "python-docs", config)
    pool += _read_package_metadata(paths["purelib"], config)
    use_package_docs = bool(config.include_package_docs)
    if not use_package_docs:
        bases, n_exact, n_near = _dedup_bases(_unique_ids(pool), config.base_dedup_threshold)
        use_package_docs = config.include_package_docs is None and len(bases) < n_needed
    if use_package_docs:
        pool += _read_docstrings(paths["purelib"], "pkg", "package-docs", config)
        bases, n_exact, n_near = _dedup_bases(_unique_ids(pool), config.base_dedup_threshold)
    return bases, n_exact, n_near, use_package_docs


def real_documents(config: SampleCorpusConfig | None = None) -> list[Document]:
    """The deduplicated real documents of sources 1-3 (Python docs, package READMEs and licenses):
    the text every Python install carries. The quality classifier's embedded reference set."""
    config = config or SampleCorpusConfig(include_package_docs=False)
    bases, _, _, _ = _read_base_documents(config, 0)  # needing 0 bases reads source 4 only when asked
    return [Document(b.id, b.text, b.source, {}) for b in bases]


def build_sample_corpus(output_path: str | Path, config: SampleCorpusConfig) -> SampleCorpusStats:
    """Build the corpus described by `config` and write it to `output_path` (gzip if it ends in .gz)."""
    output_path = Path(output_path)
    n = config.n_documents
    n_near = round(n * config.near_duplicate_fraction)
    n_exact = round(n * config.exact_duplicate_fraction)
    n_low = round(n * config.low_quality_fraction)
    n_bases = n - n_near - n_exact - n_low
    if n_bases < 1:
        raise ValueError(f"n_documents={n} leaves no room for base documents after the synthetic ones")

    available, n_dropped_exact, n_dropped_near, used_package_docs = _read_base_documents(config, n_bases)
    # Beyond the real text this machine has (~38k documents with package docstrings), a larger corpus
    # gets more near-duplicates per base instead: web corpora are like that too. Stats say how many.
    n_extra_near = max(0, n_bases - len(available)) if len(available) >= 1 else 0
    if not available:
        raise ValueError("no base documents available: the Python installation has no readable sources")
    n_bases -= n_extra_near
    n_near += n_extra_near
    chosen = sorted(random.Random(f"{config.seed}:bases").sample(range(len(available)), n_bases))
    bases = [available[i] for i in chosen]
    vocab = _vocabulary(bases, random.Random(f"{config.seed}:vocab"))
    records = [{"id": b.id, "text": b.text, "source": b.source, "metadata": {}} for b in bases]

    levels, weights = zip(*config.near_duplicate_levels)
    level_counts = dict(zip(levels, _split(n_near, list(weights))))
    level_of_item = [level for level, count in level_counts.items() for _ in range(count)]
    eligible = [i for i, b in enumerate(bases) if len(b.text.split()) >= config.min_near_dup_words]
    if n_near and not eligible:
        raise ValueError(f"no base document has min_near_dup_words={config.min_near_dup_words} words")
    shingler = Shingler()
    for i, level in track(list(enumerate(level_of_item)), desc="near-duplicates", total=n_near):
        rng = random.Random(f"{config.seed}:near:{i}")
        for _ in range(50):
            b = rng.choice(eligible)
            made = _near_duplicate(bases[b].text, shingler.shingle_set(bases[b].text), level, rng, vocab, shingler)
            if made is not None:
                break
        else:
            raise ValueError(f"could not make a {level} near-duplicate in 50 tries: raise min_near_dup_words")
        text, edits, j = made
        metadata = {"near_duplicate_of": bases[b].id, "near_duplicate_edit": edits,
                    "near_duplicate_level": level, "near_duplicate_jaccard": round(j, 4)}  # fmt: skip
        records.append({"id": f"neardup:{i}", "text": text, "source": bases[b].source, "metadata": metadata})

    non_ascii = [i for i, b in enumerate(bases) if not b.text.isascii()] or list(range(len(bases)))
    variants = Counter()
    for i in track(range(n_exact), desc="exact duplicates", total=n_exact):
        b, variant, text = _exact_duplicate(bases, non_ascii, random.Random(f"{config.seed}:exact:{i}"))
        variants[variant] += 1
        metadata = {"exact_duplicate_of": bases[b].id, "exact_duplicate_variant": variant}
        records.append({"id": f"exactdup:{i}", "text": text, "source": bases[b].source, "metadata": metadata})

    kind_counts = _split(n_low, [1.0] * len(LOW_QUALITY_KINDS))
    for kind, count in zip(LOW_QUALITY_KINDS, kind_counts):
        for i in range(count):
            text = low_quality_page(kind, random.Random(f"{config.seed}:lowq:{kind}:{i}"), vocab)
            records.append({"id": f"lowq:{kind}:{i}", "text": text, "source": "synthetic-low-quality",
                            "metadata": {"synthetic_low_quality": kind}})  # fmt: skip

    assert len(records) == n and len({r["id"] for r in records}) == n
    random.Random(f"{config.seed}:order").shuffle(records)
    _write_jsonl(records, output_path)
    return SampleCorpusStats(
        output_path=str(output_path),
        n_documents=n,
        n_bases=n_bases,
        n_bases_available=len(available),
        n_bases_dropped_exact=n_dropped_exact,
        n_bases_dropped_near=n_dropped_near,
        used_package_docs=used_package_docs,
        n_extra_near_duplicates=n_extra_near,
        n_by_source=dict(sorted(Counter(r["source"] for r in records).items())),
        n_by_low_quality_kind=dict(zip(LOW_QUALITY_KINDS, kind_counts)),
        n_by_near_duplicate_level=level_counts,
        n_by_exact_duplicate_variant={v: variants[v] for v in EXACT_DUPLICATE_VARIANTS},
    )


def _write_jsonl(records: list[dict], path: Path) -> None:
    """JSONL, gzip (mtime 0, no file name in the header) when the path ends in .gz; atomic."""
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as raw:
            gz = path.suffix == ".gz"
            out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) if gz else raw
            for record in records:
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            if out is not raw:
                out.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="output JSONL path (.gz for gzip)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--n-documents", type=int, help="override the preset's n_documents")
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("n_documents", args.n_documents), ("seed", args.seed)) if v is not None}
    try:
        config = dataclasses.replace(PRESETS[args.preset](), **overrides)
        stats = build_sample_corpus(args.output, config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(stats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
