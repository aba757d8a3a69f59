"""Curating documentation that Frugal was never tuned on: language ID of technical English, quality transfer
leave-one-domain-out, and a whole documentation corpus through curation, the old recipe beside the new.

    .venv/bin/python bench/curation_transfer.py        (make bench-transfer; about 5 minutes on 2 cores)

1. Language ID on English command references and API documentation of this machine: manual pages
   (`man -l`, section 1) and Perl modules' documentation (`pod2text`). The share that passes
   min_language_score (0.65), judged on the whole text and by the paragraph vote. The vote's two
   parameters were chosen on 300 other manual pages; the Perl documentation was not looked at before.
2. Quality transfer: `pipelines.quality.transfer_by_domain` over the reference domains: trained on all but
   one, scored on the held-out domain's real documents against junk made from its vocabulary.
3. An unseen documentation corpus: every Perl module's documentation (no reference domain holds Perl, and
   nothing was tuned on it), curated end to end twice with the stage functions:
   - before: whole-text language ID, and the classifier trained on the Python reference against a sample
     of the corpus itself (the recipe before issue 15);
   - now: the defaults (paragraph vote; reference domains against junk, never the corpus).
   It reports each stage's kept count and the share of the documents that survive near-dedup which reach
   the shards.

Writes bench/results/curation_transfer.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import random
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pipelines.clean import CleanConfig, clean
from pipelines.curriculum import CurriculumConfig, build_curriculum
from pipelines.filters import DocumentFilter, FilterConfig, filter_documents
from pipelines.ingest import ingest
from pipelines.near_dedup import NearDedupConfig, near_dedup
from pipelines.quality import QualityModelConfig, train_quality_classifier, transfer_by_domain
from pipelines.quality_score import score_documents
from pipelines.reference import ReferenceConfig, reference_domains

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DOMAINS = ("python-reference", "python-stdlib", "package-readmes")


def render(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env={**os.environ, "MANWIDTH": "80"})
    return out.stdout.replace("\b", "")  # no overstrike when not a terminal, but be sure


def manual_pages(n: int, seed: int) -> list[str]:
    paths = sorted(glob.glob("/usr/share/man/man1/*.gz"))
    paths = random.Random(seed).sample(paths, min(n, len(paths)))
    with ThreadPoolExecutor(2) as pool:
        texts = list(tqdm(pool.map(lambda p: render(["man", "-l", p]), paths), total=len(paths), desc="man pages"))
    return [t for t in texts if len(t.split()) >= 50]


def perl_docs() -> list[tuple[str, str]]:
    roots = ("/usr/share/perl", "/usr/share/perl5")
    paths = sorted(p for root in roots for p in glob.glob(f"{root}/**/*.pm", recursive=True))
    with ThreadPoolExecutor(2) as pool:
        texts = list(tqdm(pool.map(lambda p: render(["pod2text", p]), paths), total=len(paths), desc="perl docs"))
    return [(p, t) for p, t in zip(paths, texts) if len(t.split()) >= 50]


def language_pass_rates(groups: dict[str, list[str]]) -> list[dict]:
    rows = []
    for language_by in ("document", "paragraphs"):
        lid = DocumentFilter(FilterConfig(language_by=language_by))
        for name, texts in groups.items():
            meta = lid.language(texts)
            passed = sum(m["language"] == "en" and m["language_score"] >= 0.65 for m in meta)
            rows.append({"corpus": name, "language_by": language_by, "n": len(texts), "passed": passed / len(texts)})
    return rows


def curate(corpus: Path, work: Path, recipe: str) -> dict:
    """Every curation stage on the corpus with the recipe's language ID and quality model: kept per stage."""
    lid = FilterConfig(language_by="document" if recipe == "before" else "paragraphs", workers=2)
    if recipe == "before":  # the Python reference against a sample of the corpus being judged, no junk
        quality = QualityModelConfig(reference=ReferenceConfig(domains=PYTHON_DOMAINS), junk_per_positive=0,
                                     measure_transfer=False)  # fmt: skip
        negatives = [str(corpus)]
    else:
        quality, negatives = QualityModelConfig(measure_transfer=False), None
    train_quality_classifier(negatives, work / "model", None, quality, log=None)
    doc = "documents.parquet"
    stages = [
        ("raw_documents", lambda: ingest([str(corpus)], work / "raw", log=None)),
        ("clean_documents", lambda: clean([str(work / "raw" / doc)], work / "clean", CleanConfig(), log=None)),
        ("near_dedup_documents",
         lambda: near_dedup([str(work / "clean" / doc)], work / "near", NearDedupConfig(), log=None)),
        ("filtered_documents", lambda: filter_documents([str(work / "near" / doc)], work / "filtered", lid, log=None)),
        ("scored_documents",
         lambda: score_documents([str(work / "filtered" / doc)], work / "scored", work / "model/model.bin", log=None)),
        ("curriculum_shards",
         lambda: build_curriculum([str(work / "scored" / doc)], work / "shards", CurriculumConfig(), log=None)),
    ]  # fmt: skip
    kept, reasons = {}, {}
    for name, run in stages:
        stats = run()
        kept[name] = stats.n_kept
        reasons[name] = dict(sorted(stats.drop_reasons.items(), key=lambda kv: -kv[1])[:3])
    survived = kept["near_dedup_documents"]
    return {
        "kept": kept,
        "top_reasons": reasons,
        "share_of_near_dedup_reaching_shards": kept["curriculum_shards"] / survived,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--man-pages", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "curation_transfer.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    perl = perl_docs()
    man = manual_pages(args.man_pages, args.seed)
    report: dict = {"language_id": language_pass_rates({"manual pages": man, "perl module docs": [t for _, t in perl]})}
    print("\n## Language ID of technical English (share passing 0.65)\n")
    print("| corpus | documents | whole text | paragraph vote |\n|---|---|---|---|")
    for name in ("manual pages", "perl module docs"):
        by = {r["language_by"]: r for r in report["language_id"] if r["corpus"] == name}
        print(f"| {name} | {by['document']['n']} | {by['document']['passed']:.1%} | {by['paragraphs']['passed']:.1%} |")

    domains = reference_domains()
    report["transfer"] = transfer_by_domain(domains, QualityModelConfig())
    print("\n## Quality transfer, leave one domain out (kept at quality_score >= 0.25)\n")
    print("| held-out domain | documents | ROC-AUC | real kept | junk kept |\n|---|---|---|---|---|")
    for t in report["transfer"]:
        print(f"| {t['domain']} | {t['n_real']} | {t['roc_auc']:.4f} | {t['real_kept']:.1%} | {t['junk_kept']:.1%} |")

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "perl-docs.jsonl"
        corpus.write_text("".join(json.dumps({"id": p, "text": t, "source": "perl-docs"}) + "\n" for p, t in perl))
        report["corpus"] = {recipe: curate(corpus, Path(tmp) / recipe, recipe) for recipe in ("before", "now")}
    print(f"\n## An unseen documentation corpus: {len(perl)} Perl modules' documentation\n")
    stages = list(report["corpus"]["now"]["kept"])
    print("| recipe | " + " | ".join(stages) + " | reaching the shards, of those after near-dedup |")
    print("|---" * (len(stages) + 2) + "|")
    for recipe, r in report["corpus"].items():
        cells = " | ".join(f"{r['kept'][s]:,}" for s in stages)
        print(f"| {recipe} | {cells} | {r['share_of_near_dedup_reaching_shards']:.1%} |")
    for recipe, r in report["corpus"].items():
        print(f"\n{recipe}: top drop reasons: " + "; ".join(f"{s}: {v}" for s, v in r["top_reasons"].items() if v))
    report["seconds"] = time.perf_counter() - started
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\n{report['seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
