"""near_dedup on datatrove's MinHash stages and executors, for corpora beyond one machine.

CLI: python -m pipelines.near_dedup_datatrove --input FOLDER --output DIR [--threshold 0.8]
     [--executor local|slurm|ray] [--tasks N] [--workers N] [--executor-arg key=value ...]

The same shingling as `pipelines.near_dedup` (word n-grams of lower-cased `\\w+` tokens) and the same
number of permutations, run as datatrove's four stages (signatures, buckets, clusters, filter), each on
the chosen executor: LocalPipelineExecutor here, SlurmPipelineExecutor or RayPipelineExecutor on a
cluster (extra executor arguments such as partition or time pass through --executor-arg). datatrove
accepts every bucket collision without verifying it, so the bands x rows are placed with the S-curve
at the threshold (the FP/FN-balanced choice, as datasketch makes it) rather than below it.

Input is validated first, by Frugal's own reader (pipelines.readers), into DIR/input/ (one JSONL per input
file, so tasks split the same way): datatrove's JsonlReader skips a malformed line with a log warning and crashes
on a `text` that is not a string, which would leave records unaccounted for. `--no-validate` skips this pass for
input that a Frugal stage wrote (it is already valid). Ids are checked unique across the whole input.

Output: DIR/kept/*.jsonl (kept documents, with metadata.minhash_cluster_id), DIR/removed/*.jsonl, and, as every
stage writes them, DIR/ledger.parquet (one row per input record: kept, `near_duplicate:<cluster>`, or the
reader's reason) and DIR/stats.json. bench/dedup.py measures it as method (c).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np

from pipelines.cli import run_stage
from pipelines.document import Document, Ledger
from pipelines.minhash import tokenize_words
from pipelines.near_dedup import STAGE, NearDedupConfig
from pipelines.readers import expand_inputs, read_documents
from pipelines.stage import Pending, StageStats, finish_stage

INPUT_DIR = "input"

EXECUTORS = {
    "local": "datatrove.executor.LocalPipelineExecutor",
    "slurm": "datatrove.executor.SlurmPipelineExecutor",
    "ray": "datatrove.executor.RayPipelineExecutor",
}


def balanced_lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands x rows minimising false-positive area below the threshold plus false-negative area above
    it, for a candidate probability 1 - (1 - s**r)**b (datasketch's rule, equal weights)."""
    s = np.linspace(0.0, 1.0, 2001)
    best = (np.inf, 1, 1)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            error = np.trapezoid(np.where(s < threshold, p, 1.0 - p), s)
            if error < best[0]:
                best = (error, b, r)
    return best[1], best[2]


def _word_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SameWords(WordTokenizer):
        """Our words, so datatrove shingles exactly as pipelines.near_dedup does."""

        def word_tokenize(self, text):
            return tokenize_words(text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    return SameWords("en")


def build_executors(
    input_folder: str,
    output_dir: str | Path,
    config: NearDedupConfig | None = None,
    executor: str = "local",
    tasks: int = 2,
    workers: int = 2,
    glob_pattern: str = "*.jsonl*",
    **executor_kwargs,
) -> list:
    """The four datatrove stages, each an executor that depends on the previous one."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    config = config or NearDedupConfig()
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {sorted(EXECUTORS)}, not {executor!r}")
    module, name = EXECUTORS[executor].rsplit(".", 1)
    executor_cls = getattr(importlib.import_module(module), name)
    out = Path(output_dir)
    if config.bands:
        bands, rows = config.bands, config.rows
    else:
        bands, rows = balanced_lsh_params(config.threshold, config.num_perm)
    minhash = MinhashConfig(
        hash_config=HashConfig(precision=64),
        num_buckets=bands,
        hashes_per_bucket=rows,
        n_grams=config.n_gram,
        seed=config.seed,
        norm_config=TextNormConfig(
            lowercase=True,
            norm_whitespace=True,
            remove_punctuation=False,
            norm_unicode_diacritics=False,
            norm_numbers=False,
        ),
    )

    def reader():
        return JsonlReader(input_folder, glob_pattern=glob_pattern)

    def make(pipeline, n_tasks, stage, depends=None):
        kwargs = {"tasks": n_tasks, "logging_dir": str(out / "logs" / stage), **executor_kwargs}
        if executor == "local":
            kwargs["workers"] = min(workers, n_tasks)
        if depends is not None:
            kwargs["depends"] = depends
        return executor_cls(pipeline, **kwargs)

    signatures = make(
        [reader(), MinhashDedupSignature(str(out / "signatures"), config=minhash, language=_word_tokenizer())],
        tasks,
        "1-signatures",
    )
    buckets = make(
        [MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=minhash)],
        bands,
        "2-buckets",
        signatures,
    )
    clusters = make(
        [MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=minhash, save_cluster_id=True)],
        1,
        "3-clusters",
        buckets,
    )
    kept = make(
        [
            reader(),
            MinhashDedupFilter(
                str(out / "remove"),
                exclusion_writer=JsonlWriter(str(out / "removed"), compression=None),
                load_cluster_ids=True,
            ),
            JsonlWriter(str(out / "kept"), compression=None),
        ],
        tasks,
        "4-filter",
        clusters,
    )
    return [signatures, buckets, clusters, kept]


def validate_input(input_folder: str, output_dir: Path) -> Ledger:
    """Every record of the input folder's files, read by pipelines.readers: documents go to
    OUTPUT/input/<n>-<file>.jsonl (the folder datatrove then reads), rejections to the returned ledger. Streams, one
    output file open at a time; a file that cannot be read at all raises InputError naming it."""
    ledger = Ledger(STAGE)
    out = output_dir / INPUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    files = expand_inputs([input_folder])
    # one output per input file, renamed into place once all are written
    pending = {f: Pending(out / f"{i:05d}-{Path(f).name.split('.')[0]}.jsonl") for i, f in enumerate(files)}
    current, handle = None, None
    try:
        for record in read_documents(files):  # one pass over all files, so ids are checked unique across them
            if not isinstance(record, Document):
                ledger.rejected(record)
                continue
            path = record.location.rsplit(":", 1)[0]
            if path != current:
                if handle:
                    handle.close()
                current = path
                handle = open(pending[path].tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed when the next opens)
            row = {"id": record.id, "text": record.text, "metadata": {**record.metadata, "source": record.source}}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if handle:
            handle.close()
    except BaseException:
        if handle:
            handle.close()
        for p in pending.values():
            p.discard()
        raise
    for p in pending.values():
        if not p.tmp.exists():  # an input without documents still gets its (empty) file
            p.tmp.write_text("")
        p.commit()
    return ledger


def run(
    input_folder: str,
    output_dir: str | Path,
    config: NearDedupConfig | None = None,
    validate: bool = True,
    ray_address: str | None = None,
    **kwargs,
) -> StageStats:
    """Validate the input (see top), run the four stages (with `depends`, running the last one runs the chain;
    datatrove skips tasks that completed in an earlier run), then write the ledger and stats.json. With the Ray
    executor this process connects to the cluster at `ray_address` (None: $RAY_ADDRESS, else "auto") first, as
    datatrove's RayPipelineExecutor expects."""
    started = time.monotonic()
    if kwargs.get("executor") == "ray":
        import os

        import ray

        ray.init(address=ray_address or os.environ.get("RAY_ADDRESS") or "auto", ignore_reinit_error=True,
                 log_to_driver=False)  # fmt: skip
    output_dir = Path(output_dir)
    ledger = validate_input(input_folder, output_dir) if validate else Ledger(STAGE)
    folder = str(output_dir / INPUT_DIR) if validate else input_folder
    if validate:
        kwargs["glob_pattern"] = "*.jsonl"
    build_executors(folder, output_dir, config, **kwargs)[-1].run()
    for kind in ("kept", "removed"):
        for path in sorted((output_dir / kind).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines: U+2028 is JSON string content
                if not line:
                    continue
                doc = json.loads(line)
                cluster = doc.get("metadata", {}).get("minhash_cluster_id", -1)
                location = doc.get("metadata", {}).get("file_path", str(path))
                if kind == "kept":
                    ledger.kept(Document(doc["id"], "", "", {}, location))
                else:
                    ledger.dropped(doc["id"], f"near_duplicate:{cluster}", "datatrove MinHash cluster", location)
    return finish_stage(output_dir, ledger, started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder (local or fsspec URL) of JSONL files")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threshold", type=float, default=NearDedupConfig().threshold)
    parser.add_argument("--executor", choices=sorted(EXECUTORS), default="local")
    parser.add_argument("--tasks", type=int, default=2, help="signature and filter tasks (one per input file)")
    parser.add_argument("--workers", type=int, default=2, help="local executor: parallel processes")
    parser.add_argument("--executor-arg", action="append", default=[], help="key=value passed to the executor")
    parser.add_argument("--no-validate", action="store_true", help="input written by a Frugal stage: skip the check")
    parser.add_argument("--ray-address", default=None, help="Ray executor: the cluster (host:port; $RAY_ADDRESS, auto)")
    args = parser.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.executor_arg)
    config = NearDedupConfig(threshold=args.threshold)
    return run_stage(
        run, args.input, args.output, config, validate=not args.no_validate, executor=args.executor,
        tasks=args.tasks, workers=args.workers, ray_address=args.ray_address, **extra,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
