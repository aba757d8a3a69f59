"""Main-content extraction from real documentation HTML: resiliparse (as before), resiliparse without the site
chrome it keeps (pipelines.text.html_main_text, the default), and trafilatura through datatrove's Trafilatura
extractor (datatrove's default).

    .venv/bin/python bench/html_extraction.py [--pages 300]      (make bench-html; about a minute)

Pages: a seeded sample of the mdBook pages of the Rust toolchain's books on this machine (the Rust book, the
Cargo book, the Rust reference, Rust by Example, ...). mdBook puts a page's body in <main> and its chrome
(keyboard help, sidebar, menu bar, chapter navigation) outside it, which gives the truth to measure against:
- body lost: the share of the body's word 5-grams missing from the extracted text;
- chrome left: the share of the chrome's word 5-grams (those not also in the body) found in it.
Writes bench/results/html_extraction.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import time
from pathlib import Path

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import HTMLTree
from tqdm import tqdm

from pipelines.text import html_main_text

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ("book", "cargo", "reference", "rust-by-example", "nomicon", "edition-guide", "rustc", "rustdoc",
         "embedded-book", "style-guide")  # fmt: skip


def grams(text: str, n: int = 5) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def truth(html: str) -> tuple[set[str], set[str]] | None:
    """(body 5-grams, chrome-only 5-grams) of an mdBook page, or None for a page without <main>."""
    tree = HTMLTree.parse(html)
    main = tree.body.query_selector("main") if tree.body is not None else None
    if main is None:
        return None
    body = grams(extract_plain_text(main.html))
    main.parent.remove_child(main)
    return body, grams(extract_plain_text(tree)) - body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "html_extraction.json"))
    args = parser.parse_args()
    from datatrove.pipeline.extractors import Trafilatura

    roots = glob.glob(os.path.expanduser("~/.rustup/toolchains/*/share/doc/rust/html"))
    roots = [r for r in roots if "stable" in r] or roots[:1]
    paths = sorted(p for r in roots for b in BOOKS for p in glob.glob(f"{r}/{b}/**/*.html", recursive=True)
                   if not p.endswith(("print.html", "404.html", "toc.html")))  # fmt: skip
    if not paths:
        raise SystemExit("no mdBook pages here: this benchmark reads the Rust toolchain's books (rustup)")
    paths = sorted(random.Random(args.seed).sample(paths, min(args.pages, len(paths))))
    pages = [(p, Path(p).read_text(encoding="utf-8", errors="replace")) for p in paths]
    pages = [(p, h, t) for p, h in pages if (t := truth(h)) is not None and t[0]]
    trafilatura = Trafilatura()
    extractors = {
        "resiliparse, main content (before)": lambda h: extract_plain_text(HTMLTree.parse(h), main_content=True),
        "resiliparse without site chrome (default)": lambda h: html_main_text(HTMLTree.parse(h)),
        "trafilatura (datatrove's Trafilatura)": lambda h: trafilatura.extract(h) or "",
    }
    rows = []
    for name, extract in extractors.items():
        lost, left, seconds = [], [], 0.0
        for _, html, (body, chrome) in tqdm(pages, desc=name):
            started = time.perf_counter()
            got = grams(extract(html))
            seconds += time.perf_counter() - started
            lost.append(len(body - got) / len(body))
            if chrome:
                left.append(len(chrome & got) / len(chrome))
        rows.append({"extractor": name, "pages": len(pages), "body_lost": sum(lost) / len(lost),
                     "chrome_left": sum(left) / len(left), "pages_with_chrome_left": sum(x > 0 for x in left),
                     "pages_per_s": len(pages) / seconds})  # fmt: skip
    print(f"\n## Main-content extraction: {len(pages)} mdBook pages of the Rust books\n")
    print("| extractor | body lost | chrome left | pages with chrome left | pages/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['extractor']} | {r['body_lost']:.1%} | {r['chrome_left']:.1%} | {r['pages_with_chrome_left']} "
              f"| {r['pages_per_s']:,.0f} |")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
