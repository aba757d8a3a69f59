"""near_dedup_documents: MinHash LSH near-duplicate clustering, one representative kept per cluster.

CLI: python -m pipelines.near_dedup --input docs.jsonl --output DIR --threshold 0.8
writes DIR/documents.parquet (kept documents, with cluster_id and cluster_size),
DIR/clusters.parquet (id, cluster_id, cluster_size, kept for every valid input document),
DIR/ledger.parquet and DIR/stats.json.

Method: word n-gram shingles -> MinHash signatures (2 processes) -> LSH banding gives candidate
pairs -> a pair is a near-duplicate when its estimated Jaccard (share of equal signature slots) is
>= threshold -> union-find clusters -> the representative is the longest document (ties: first in
input order). cluster_id is the input position (0-based, among valid documents) of the cluster's
first member, so it is stable for the same input.

Memory: signatures stay in memory (num_perm x 4 bytes per document: 51 MB for 100k documents at 128
permutations) together with ids and lengths; texts are streamed twice and never held.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.cli import reader_config, run_stage, stage_parser
from pipelines.document import DOCUMENT_SCHEMA, Document, Ledger
from pipelines.minhash import (
    MinHasher,
    estimated_jaccard,
    lsh_candidate_pairs,
    lsh_params_for_threshold,
    union_find_clusters,
)
from pipelines.parallel import batched, default_workers, ordered_map
from pipelines.progress import track
from pipelines.readers import ReaderConfig, count_records, read_documents
from pipelines.stage import DOCUMENTS_FILE, DocumentWriter, StageStats, finish_stage, logger, write_table

STAGE = "near_dedup_documents"
CLUSTERS_FILE = "clusters.parquet"
NEAR_DEDUP_SCHEMA = DOCUMENT_SCHEMA.append(pa.field("cluster_id", pa.int64(), nullable=False)).append(
    pa.field("cluster_size", pa.int32(), nullable=False)
)
CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("cluster_id", pa.int64(), nullable=False),
        pa.field("cluster_size", pa.int32(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
    ]
)


@dataclass(kw_only=True, slots=True)
class NearDedupConfig:
    """MinHash LSH near-dedup."""

    threshold: float = 0.8
    """Target Jaccard similarity of word n-gram sets above which two documents are near-duplicates."""
    n_gram: int = 5
    """Words per shingle."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    bands: int | None = None
    """LSH bands; None derives bands and rows from the threshold (see lsh_params_for_threshold)."""
    rows: int | None = None
    """Signature slots per band; set together with `bands`."""
    seed: int = 1
    """Seed of the permutations: the same seed gives the same clusters."""
    workers: int = field(default_factory=default_workers)
    """Processes computing signatures; 1 runs inline."""
    batch_docs: int = 512
    """Documents per task sent to a worker."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """How input records become documents."""

    def lsh_params(self) -> tuple[int, int]:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("near-dedup: set both `bands` and `rows`, or neither")
        if self.bands is None:
            return lsh_params_for_threshold(self.threshold, self.num_perm)
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"near-dedup: bands x rows = {self.bands * self.rows} > num_perm = {self.num_perm}")
        return self.bands, self.rows


@dataclass(slots=True)
class Clusters:
    """The result of clustering N documents."""

    cluster_id: np.ndarray  # (N,) int64: index of the cluster's first member
    cluster_size: np.ndarray  # (N,) int32
    kept: np.ndarray  # (N,) bool: the cluster's representative
    n_candidate_pairs: int
    n_duplicate_pairs: int


def cluster_signatures(sig_NK: np.ndarray, n_chars: np.ndarray, config: NearDedupConfig) -> Clusters:
    """LSH candidates -> verified pairs -> union-find -> one representative per cluster."""
    bands, rows = config.lsh_params()
    pairs = lsh_candidate_pairs(sig_NK, bands, rows)
    duplicates = pairs[estimated_jaccard(sig_NK, pairs) >= config.threshold]
    cluster_id = union_find_clusters(len(sig_NK), duplicates)
    sizes = np.bincount(cluster_id, minlength=len(sig_NK))
    # Representative: the longest member, ties to the first in input order. lexsort's last key is primary.
    order = np.lexsort((np.arange(len(sig_NK)), -n_chars, cluster_id))
    first_of_cluster = np.ones(len(order), dtype=bool)
    first_of_cluster[1:] = cluster_id[order][1:] != cluster_id[order][:-1]
    kept = np.zeros(len(sig_NK), dtype=bool)
    kept[order[first_of_cluster]] = True
    return Clusters(cluster_id, sizes[cluster_id].astype(np.int32), kept, len(pairs), len(duplicates))


def near_dedup(
    inputs: list[str],
    output_dir: str | Path,
    config: NearDedupConfig | None = None,
    log: logging.Logger | None = logger,
) -> StageStats:
    config = config or NearDedupConfig()
    config.lsh_params()  # bad settings fail before any work
    started = time.monotonic()
    output_dir = Path(output_dir)
    hasher = MinHasher(num_perm=config.num_perm, n_gram=config.n_gram, seed=config.seed)
    total = count_records(inputs)

    # Pass 1: signatures of the valid documents (in input order).
    ids: list[str] = []
    n_chars: list[int] = []
    signatures: list[np.ndarray] = []
    docs = (r for r in read_documents(inputs, config.reader) if isinstance(r, Document))
    for batch, sig in ordered_map(
        hasher.signatures,
        batched(track(docs, desc=f"{STAGE}: signatures", total=total, log=log), config.batch_docs),
        payload=lambda batch: [d.text for d in batch],
        workers=config.workers,
    ):
        ids.extend(d.id for d in batch)
        n_chars.extend(len(d.text) for d in batch)
        signatures.append(sig)
    sig_NK = np.concatenate(signatures) if signatures else np.empty((0, config.num_perm), dtype=np.uint32)
    clusters = cluster_signatures(sig_NK, np.asarray(n_chars, dtype=np.int64), config)
    if log is not None:
        log.info(
            f"{STAGE}: {clusters.n_candidate_pairs} candidate pairs, {clusters.n_duplicate_pairs} above "
            f"{config.threshold}, {int((~clusters.kept).sum())} of {len(ids)} documents are near-duplicates"
        )

    # Pass 2: write the representatives; ledger every record in input order.
    ledger = Ledger(STAGE)
    bytes_in = 0
    position = 0
    representative = np.zeros(len(ids), dtype=np.int64)  # cluster_id -> position of the kept member
    representative[clusters.cluster_id[clusters.kept]] = np.flatnonzero(clusters.kept)
    with DocumentWriter(output_dir / DOCUMENTS_FILE, NEAR_DEDUP_SCHEMA) as writer:
        for record in track(read_documents(inputs, config.reader), desc=f"{STAGE}: write", total=total, log=log):
            if not isinstance(record, Document):
                ledger.rejected(record)
                continue
            assert record.id == ids[position], "input changed between the two passes"
            bytes_in += len(record.text.encode("utf-8"))
            cid, size = int(clusters.cluster_id[position]), int(clusters.cluster_size[position])
            if clusters.kept[position]:
                writer.write(record, cluster_id=cid, cluster_size=size)
                ledger.kept(record)
            else:
                rep = ids[representative[cid]]
                ledger.dropped(record.id, f"near_duplicate:{cid}", f"cluster of {size}, kept {rep}", record.location)
            position += 1

    clusters_file = write_table(
        pa.Table.from_pydict(
            {
                "id": ids,
                "cluster_id": clusters.cluster_id,
                "cluster_size": clusters.cluster_size,
                "kept": clusters.kept,
            },
            schema=CLUSTERS_SCHEMA,
        ),
        output_dir / CLUSTERS_FILE,
    )
    bands, rows = config.lsh_params()
    size_hist = Counter(int(s) for s in clusters.cluster_size[clusters.kept])
    extra = {
        "threshold": config.threshold,
        "num_perm": config.num_perm,
        "bands": bands,
        "rows": rows,
        "n_gram": config.n_gram,
        "n_candidate_pairs": clusters.n_candidate_pairs,
        "n_duplicate_pairs": clusters.n_duplicate_pairs,
        "n_clusters": int(clusters.kept.sum()),
        "near_duplicate_rate": float((~clusters.kept).mean()) if len(ids) else 0.0,
        "cluster_size_histogram": {str(k): v for k, v in sorted(size_hist.items())},
    }
    files = [writer, clusters_file]
    return finish_stage(output_dir, ledger, started, files, bytes_in=bytes_in, bytes_kept=writer.n_bytes, extra=extra)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    defaults = NearDedupConfig()
    parser.add_argument("--threshold", type=float, default=defaults.threshold, help="Jaccard threshold")
    parser.add_argument("--n-gram", type=int, default=defaults.n_gram, help="words per shingle")
    parser.add_argument("--num-perm", type=int, default=defaults.num_perm, help="MinHash permutations")
    parser.add_argument("--bands", type=int, default=None, help="LSH bands (with --rows)")
    parser.add_argument("--rows", type=int, default=None, help="LSH rows per band (with --bands)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    args = parser.parse_args(argv)
    config = NearDedupConfig(
        threshold=args.threshold,
        n_gram=args.n_gram,
        num_perm=args.num_perm,
        bands=args.bands,
        rows=args.rows,
        seed=args.seed,
        workers=args.workers,
        reader=reader_config(args),
    )
    return run_stage(near_dedup, args.input, args.output, config)


if __name__ == "__main__":
    raise SystemExit(main())
