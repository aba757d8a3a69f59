"""The quality classifier's training data: edited reference text in several domains, and junk made from it.

Positives are kinds of edited text a machine carries offline, one domain each:
- `python-reference`: the pydoc topics (the language reference);
- `python-stdlib`: the standard library's module, class and function docstrings;
- `package-readmes`: the READMEs and license texts of the installed Python packages;
- `toolchain-books`: the HTML books of installed toolchains (the Rust book, the Cargo book, the Rust reference
  and their siblings under rustup), main content extracted with resiliparse;
- `html-manuals`: other HTML manuals under /usr/share/doc and npm's documentation.
A domain this machine lacks is left out; at least two are needed.

Negatives are junk made from the positives' own vocabulary (spam, keyword lists, boilerplate, gibberish,
templated pages: the generators of `pipelines.sample_corpus`), so that the classifier learns what junk looks
like, not which words a domain uses. The corpus being judged is never part of it: a classifier trained
against a sample of that corpus learns "not this corpus" (DCLM's negatives are a general crawl, never the
data being curated).
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass

from pipelines.document import Document
from pipelines.text import html_main_text

DOMAINS = ("python-reference", "python-stdlib", "package-readmes", "toolchain-books", "html-manuals")
_RUST_BOOKS = ("book", "cargo", "reference", "rust-by-example", "edition-guide", "nomicon", "rustc", "rustdoc",
               "embedded-book", "style-guide", "unstable-book", "clippy")  # fmt: skip
_HTML_MANUALS = (
    "/usr/share/doc/*/html/**/*.html",
    "/usr/share/doc/*/*.html",
    "/usr/lib/node_modules/npm/docs/output/**/*.html",
)


@dataclass(kw_only=True, slots=True)
class ReferenceConfig:
    """Which reference text to read, and how much of it."""

    domains: tuple[str, ...] = DOMAINS
    """The domains to read (see the module docstring); those this machine lacks are left out."""
    max_per_domain: int = 400
    """A seeded sample of at most this many documents per domain, so that no domain dominates."""
    min_words: int = 20
    """Shorter documents are left out."""
    max_chars: int = 20_000
    """Longer documents are cut here (the classifier reads far less)."""
    seed: int = 0


def _sample(docs: list[Document], config: ReferenceConfig) -> list[Document]:
    docs = sorted({d.id: d for d in docs if len(d.text.split()) >= config.min_words}.values(), key=lambda d: d.id)
    if len(docs) > config.max_per_domain:
        docs = random.Random(f"{config.seed}:{len(docs)}").sample(docs, config.max_per_domain)
    return sorted(docs, key=lambda d: d.id)


def _python_domains(config: ReferenceConfig) -> dict[str, list[Document]]:
    from pipelines.sample_corpus import SampleCorpusConfig, real_documents

    docs = real_documents(SampleCorpusConfig(min_words=config.min_words, include_package_docs=False))
    prefix = {"pydoc:": "python-reference", "stdlib:": "python-stdlib", "dist:": "package-readmes"}
    out: dict[str, list[Document]] = {}
    for d in docs:
        domain = next((name for p, name in prefix.items() if d.id.startswith(p)), "package-readmes")
        out.setdefault(domain, []).append(d)
    return out


def _html_documents(paths: list[str], domain: str, config: ReferenceConfig) -> list[Document]:
    from resiliparse.parse.html import HTMLTree

    paths = sorted(set(paths))
    if len(paths) > 3 * config.max_per_domain:  # read a seeded sample: some books have thousands of pages
        paths = sorted(random.Random(f"{config.seed}:{domain}").sample(paths, 3 * config.max_per_domain))
    docs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = html_main_text(HTMLTree.parse(f.read()))[: config.max_chars]
        except OSError:
            continue
        docs.append(Document(f"{domain}:{path}", text, domain, {}))
    return docs


def _toolchain_books() -> list[str]:
    roots = glob.glob(os.path.expanduser("~/.rustup/toolchains/*/share/doc/rust/html"))
    roots = [r for r in roots if "stable" in r] or roots[:1]  # one toolchain: the books repeat across them
    return [p for r in roots for book in _RUST_BOOKS for p in glob.glob(f"{r}/{book}/**/*.html", recursive=True)
            if not p.endswith(("print.html", "404.html", "toc.html"))]  # fmt: skip


def reference_domains(config: ReferenceConfig | None = None) -> dict[str, list[Document]]:
    """The reference documents of every configured domain this machine has, by domain."""
    config = config or ReferenceConfig()
    unknown = set(config.domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown reference domains {sorted(unknown)}; known: {list(DOMAINS)}")
    found: dict[str, list[Document]] = {}
    if {"python-reference", "python-stdlib", "package-readmes"} & set(config.domains):
        found.update(_python_domains(config))
    if "toolchain-books" in config.domains:
        found["toolchain-books"] = _html_documents(_toolchain_books(), "toolchain-books", config)
    if "html-manuals" in config.domains:
        paths = [p for pattern in _HTML_MANUALS for p in glob.glob(pattern, recursive=True)]
        found["html-manuals"] = _html_documents(paths, "html-manuals", config)
    return {d: docs for d in config.domains if (docs := _sample(found.get(d, []), config))}


def junk_documents(texts: list[str], n: int, seed: str) -> list[Document]:
    """n junk pages, the five kinds in turn, made from the texts' vocabulary."""
    from pipelines.sample_corpus import LOW_QUALITY_KINDS, low_quality_page, vocabulary

    vocab = vocabulary(texts)
    if len(vocab) < 10:
        raise ValueError(f"the reference texts give too small a vocabulary ({len(vocab)} words) to make junk from")
    out = []
    for i in range(n):
        kind = LOW_QUALITY_KINDS[i % len(LOW_QUALITY_KINDS)]
        text = low_quality_page(kind, random.Random(f"{seed}:junk:{i}"), vocab)
        out.append(Document(f"junk:{kind}:{i}", text, "synthetic-junk", {"synthetic_low_quality": kind}))
    return out
