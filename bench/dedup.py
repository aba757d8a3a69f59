"""Near-dedup benchmark: our stage vs datasketch vs datatrove on labelled near-duplicates.

    .venv/bin/python bench/dedup.py [--n-documents 50000] [--threshold 0.8]

The corpus is the sample builder's `bench_near_dedup` preset: real base documents (deduplicated
against each other at Jaccard >= 0.5, so the labels are exact) plus derived near-duplicates at three
edit levels, each labelled with its base and its exact word-5-gram Jaccard to it. Ground truth at
threshold t: a derived document belongs with its base when that Jaccard is >= t; "heavy" edits
(0.5-0.75) are hard negatives. Scores are pairwise: precision and recall over the pairs of
documents that share a cluster.

Each method runs in its own process, from reading the JSONL shards to a cluster per document
(writing its outputs included); documents/s = documents / that wall time; peak memory = the largest
sum of the resident sets of that process and all its descendants (workers, forkservers), sampled
every 20 ms from /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipelines.minhash import tokenize_words, union_find_clusters

ROOT = Path(__file__).resolve().parents[1]

NUM_PERM = 128
N_GRAM = 5
SEED = 1
N_SHARDS = 2  # one per core, so datatrove's file-level tasks can use both cores


# --- the methods, each run in a fresh process -------------------------------------------------


def run_ours(shards: list[str], work: Path, threshold: float, workers: int) -> dict[str, int]:
    import pyarrow.parquet as pq

    from pipelines.near_dedup import NearDedupConfig, near_dedup

    config = NearDedupConfig(threshold=threshold, n_gram=N_GRAM, num_perm=NUM_PERM, seed=SEED, workers=workers)
    near_dedup(shards, work / "out", config, log=None)
    table = pq.read_table(work / "out" / "clusters.parquet", columns=["id", "cluster_id"])
    return dict(zip(table["id"].to_pylist(), table["cluster_id"].to_pylist()))


def run_datasketch(shards: list[str], work: Path, threshold: float, workers: int) -> dict[str, int]:
    from datasketch import MinHash, MinHashLSH

    ids, shingle_sets = [], []
    for shard in shards:
        with open(shard, encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                words = tokenize_words(doc["text"])  # the same shingling as ours
                n = min(N_GRAM, len(words))
                ids.append(doc["id"])
                shingle_sets.append({" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)})
    minhashes = MinHash.bulk(shingle_sets, num_perm=NUM_PERM, seed=SEED)
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    pairs = [(i, j) for i, m in enumerate(minhashes) for j in lsh.query(m) if i < j]
    labels = union_find_clusters(len(ids), np.array(pairs, dtype=np.int64).reshape(-1, 2))
    return dict(zip(ids, labels.tolist()))


def run_datatrove(shards: list[str], work: Path, threshold: float, workers: int) -> dict[str, int]:
    """pipelines.near_dedup_datatrove on the local executor: datatrove's four MinHash stages."""
    from pipelines.near_dedup import NearDedupConfig
    from pipelines.near_dedup_datatrove import run

    config = NearDedupConfig(threshold=threshold, n_gram=N_GRAM, num_perm=NUM_PERM, seed=SEED)
    run(str(Path(shards[0]).parent), work, config, tasks=len(shards), workers=workers, glob_pattern="*.jsonl")
    labels, next_singleton = {}, -1
    for folder in ("kept", "removed"):
        for path in sorted((work / folder).glob("*.jsonl")):
            for line in path.open():
                doc = json.loads(line)
                cid = doc["metadata"].get("minhash_cluster_id", -1)
                if cid == -1:
                    cid, next_singleton = next_singleton, next_singleton - 1
                labels[doc["id"]] = cid
    return labels


METHODS = {"ours": run_ours, "datasketch": run_datasketch, "datatrove": run_datatrove}


def child_main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    started = time.perf_counter()
    labels = METHODS[args.method](args.shards, work, args.threshold, args.workers)
    seconds = time.perf_counter() - started
    (work / "result.json").write_text(json.dumps({"seconds": seconds, "labels": labels}))


def tree_rss_bytes(root: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        todo.extend(children.get(pid, []))
    return total


def run_measured(cmd: list[str]) -> int:
    """Run cmd to completion; return the peak resident memory of its process tree in bytes."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.02)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return peak


# --- scoring ---------------------------------------------------------------------------------


def pair_count(counts) -> int:
    counts = np.asarray(list(counts), dtype=np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pairwise_scores(truth: dict[str, object], predicted: dict[str, object]) -> tuple[float, float, float]:
    """Precision, recall, F1 over same-cluster pairs (computed from the contingency table)."""
    ids = list(truth)
    missing = [i for i in ids if i not in predicted]
    if missing:
        raise ValueError(f"prediction lacks {len(missing)} documents, e.g. {missing[:3]}")
    true_pairs = pair_count(Counter(truth[i] for i in ids).values())
    pred_pairs = pair_count(Counter(predicted[i] for i in ids).values())
    both = pair_count(Counter((truth[i], predicted[i]) for i in ids).values())
    precision = both / pred_pairs if pred_pairs else 1.0
    recall = both / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def load_labels(shards: list[str], threshold: float):
    truth, level_of = {}, {}
    for shard in shards:
        lines = Path(shard).read_text(encoding="utf-8").splitlines()
        for line in lines:
            doc = json.loads(line)
            meta = doc["metadata"]
            base = meta.get("near_duplicate_of")
            if base is not None and meta["near_duplicate_jaccard"] >= threshold:
                truth[doc["id"]] = base
            else:
                truth[doc["id"]] = doc["id"]
            if base is not None:
                level_of[doc["id"]] = (meta["near_duplicate_level"], base)
    return truth, level_of


def level_merge_rates(level_of, predicted) -> dict[str, float]:
    merged = defaultdict(list)
    for doc_id, (level, base) in level_of.items():
        merged[level].append(predicted[doc_id] == predicted[base])
    return {level: float(np.mean(v)) for level, v in sorted(merged.items())}


def build_corpus(n_documents: int, folder: Path) -> list[str]:
    from pipelines.sample_corpus import bench_near_dedup, build_sample_corpus

    folder.mkdir(parents=True, exist_ok=True)
    shards = [folder / f"part-{i:05d}.jsonl" for i in range(N_SHARDS)]
    stamp = folder / f"built-{n_documents}"
    if not stamp.exists() or not all(s.exists() for s in shards):
        full = folder / "corpus.jsonl"
        build_sample_corpus(full, bench_near_dedup(n_documents=n_documents))
        lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
        for i, shard in enumerate(shards):
            shard.write_text("".join(lines[i::N_SHARDS]), encoding="utf-8")
        full.unlink()
        for old in folder.glob("built-*"):
            old.unlink()
        stamp.touch()
    return [str(s) for s in shards]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-documents", type=int, default=50_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["ours", "datasketch", "datatrove"])
    parser.add_argument("--corpus-dir", default=str(ROOT / "bench" / "results" / "dedup_corpus"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "dedup.json"))
    # child mode
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--shards", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        child_main(args)
        return

    print(f"building the labelled corpus ({args.n_documents} documents) ...", file=sys.stderr)
    shards = build_corpus(args.n_documents, Path(args.corpus_dir))
    truth, level_of = load_labels(shards, args.threshold)
    n_docs = len(truth)
    n_dup_docs = sum(1 for k, v in truth.items() if k != v)
    print(f"{n_docs} documents, {n_dup_docs} near-duplicates at J >= {args.threshold}", file=sys.stderr)

    rows = []
    for method in args.methods:
        work = Path(tempfile.mkdtemp(prefix=f"dedup-{method}-"))
        print(f"running {method} ...", file=sys.stderr)
        cmd = [
            sys.executable,
            __file__,
            "--method",
            method,
            "--shards",
            *shards,
            "--work",
            str(work),
            "--threshold",
            str(args.threshold),
            "--workers",
            str(args.workers),
        ]
        peak_bytes = run_measured(cmd)
        result = json.loads((work / "result.json").read_text())
        shutil.rmtree(work, ignore_errors=True)
        precision, recall, f1 = pairwise_scores(truth, result["labels"])
        rows.append(
            {
                "method": method,
                "docs_per_s": n_docs / result["seconds"],
                "seconds": result["seconds"],
                "peak_mib": peak_bytes / 2**20,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "merged_with_base": level_merge_rates(level_of, result["labels"]),
            }
        )

    labels = {
        "ours": "(a) frugal near_dedup",
        "datasketch": "(b) datasketch MinHash.bulk + MinHashLSH",
        "datatrove": "(c) datatrove MinHash stages",
    }
    ref = next((r for r in rows if r["method"] == "datasketch"), None)
    header = (
        "| method | docs/s | vs (b) | wall s | peak MiB | precision | recall | F1 | merged: light / medium / heavy |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        m = r["merged_with_base"]
        speedup = f"{r['docs_per_s'] / ref['docs_per_s']:.1f}x" if ref else "-"
        print(
            f"| {labels[r['method']]} | {r['docs_per_s']:,.0f} | {speedup} | {r['seconds']:.1f} | "
            f"{r['peak_mib']:,.0f} | "
            f"{r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | "
            f"{m.get('light', 0):.3f} / {m.get('medium', 0):.3f} / {m.get('heavy', 0):.3f} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {"n_documents": n_docs, "n_near_duplicates": n_dup_docs, "threshold": args.threshold, "rows": rows},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
