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
from pipelines.dedup_index import PartitionIndex, index_record
from pipelines.document import DOCUMENT_SCHEMA, Document, Ledger
from pipelines.minhash import (
    MinHasher,
    band_keys,
    estimated_jaccard,
    has_shingles_N,
    lsh_candidate_pairs,
    lsh_candidate_pairs_against,
    lsh_params_for_threshold,
    union_find_clusters,
)
from pipelines.parallel import batched, default_workers, ordered_map, workers_for
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
    inline_below: int = 20_000
    """Fewer input documents than this run inline: a signature costs ~0.25 ms, so 2 workers lose to their start-up
    below ~20,000 documents (a 4,933-document drop: 1.4 s inline, 1.65 s on 2 workers)."""
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


def index_params(config: NearDedupConfig) -> dict:
    """What the clusters in a MinHash index depend on: a drop is only checked against an index made the same way."""
    bands, rows = config.lsh_params()
    return {"threshold": config.threshold, "n_gram": config.n_gram, "num_perm": config.num_perm, "bands": bands,
            "rows": rows, "seed": config.seed}  # fmt: skip


INDEX_SCHEMA_FIELDS = [
    pa.field("position", pa.int64(), nullable=False),  # global: drops before this one hold the positions below
    pa.field("id", pa.string(), nullable=False),
    pa.field("n_chars", pa.int64(), nullable=False),
    pa.field("cluster_id", pa.int64(), nullable=False),  # when the drop was added; later merges: index.json
    pa.field("kept", pa.bool_(), nullable=False),
]


@dataclass(slots=True)
class IndexedClusters:
    """A new drop clustered against the index: its own Clusters (ids are global positions) plus, per document, the
    earlier document kept for its cluster (None when the representative is in this drop)."""

    clusters: Clusters
    earlier_representative: list[tuple[str, str] | None]  # (id, drop key)
    merges: list[tuple[int, int]]


def cluster_against_index(
    sig_MK: np.ndarray, n_chars_M: np.ndarray, index: PartitionIndex, key: str, config: NearDedupConfig
) -> IndexedClusters:
    """Cluster a new drop's M documents together with the drops indexed before it, hashing only the new ones.

    Equal to clustering all drops at once, in drop order, with one rule for which member is kept: a cluster that
    holds an earlier drop's documents keeps the member that drop kept (a published document is never withdrawn),
    so the new members are all dropped. A cluster of new documents only keeps its longest member (ties: the first),
    as `cluster_signatures` does. When a new document joins two earlier clusters, they become one (the smaller id;
    the merge is recorded in the index) and both their kept members stay kept.
    """
    bands, rows = config.lsh_params()
    entries = index.before(key)
    offset = index.first_position(key)
    M = len(sig_MK)
    own = cluster_signatures(sig_MK, n_chars_M, config)  # the new drop against itself (its own positions)
    old = index.load(entries, ["position", "id", "cluster_id", "kept", "signature", "band_keys"])
    if old is None or M == 0:
        own.cluster_id = own.cluster_id + offset
        return IndexedClusters(own, [None] * M, [])

    # Earlier clusters as they stand now: the ids each drop wrote, then the merges later drops recorded.
    merged = index.merges(entries)

    def resolve(c: int) -> int:
        while c in merged:
            c = merged[c]
        return c

    old_cluster = np.array([resolve(c) for c in old["cluster_id"].to_numpy()], dtype=np.int64)
    old_sig = np.asarray(old["signature"].combine_chunks().flatten()).reshape(old.num_rows, -1)
    old_keys = np.asarray(old["band_keys"].combine_chunks().flatten()).reshape(old.num_rows, bands)
    searchable = np.flatnonzero(has_shingles_N(old_sig))
    new_has = np.flatnonzero(has_shingles_N(sig_MK))
    pairs = lsh_candidate_pairs_against(band_keys(sig_MK[new_has], bands, rows), old_keys[searchable])
    pairs = np.stack([searchable[pairs[:, 0]], new_has[pairs[:, 1]]], axis=1) if len(pairs) else pairs
    similar = (old_sig[pairs[:, 0]] == sig_MK[pairs[:, 1]]).mean(axis=1) >= config.threshold if len(pairs) else []
    pairs = pairs[similar] if len(pairs) else pairs

    # Union-find over the earlier clusters touched and the new documents: nodes sorted by global id, so a
    # component's smallest node is its smallest global id, the cluster id a one-shot run gives it.
    touched = np.unique(old_cluster[pairs[:, 0]]) if len(pairs) else np.empty(0, dtype=np.int64)
    nodes = np.concatenate([touched, offset + np.arange(M)])
    new_node = len(touched) + np.arange(M)
    edges = [np.stack([new_node[own_i], new_node[own_j]], axis=1) for own_i, own_j in _own_edges(own)]
    if len(pairs):
        edges.append(np.stack([np.searchsorted(touched, old_cluster[pairs[:, 0]]), new_node[pairs[:, 1]]], axis=1))
    root = union_find_clusters(len(nodes), np.concatenate(edges) if edges else np.empty((0, 2), dtype=np.int64))
    cluster_id = nodes[root[new_node]]

    # Earlier members per touched cluster, their kept member, and the merges this drop makes.
    old_size = dict(zip(*np.unique(old_cluster[np.isin(old_cluster, touched)], return_counts=True)))
    drop_of = np.repeat([e.key for e in entries], [e.rows for e in entries])
    kept_rows = np.flatnonzero(old["kept"].to_numpy(zero_copy_only=False) & np.isin(old_cluster, touched))
    representative = {}
    for r in kept_rows[::-1]:  # the smallest position wins
        representative[int(old_cluster[r])] = (old["id"][int(r)].as_py(), str(drop_of[r]))
    merges = [(int(nodes[t]), int(nodes[root[t]])) for t in range(len(touched)) if root[t] != t]

    component_has_old = np.zeros(len(nodes), dtype=bool)
    component_has_old[root[: len(touched)]] = True
    has_old = component_has_old[root[new_node]]
    sizes = Counter(cluster_id.tolist())
    for t in range(len(touched)):
        sizes[int(nodes[root[t]])] += int(old_size[nodes[t]])
    # New-only clusters keep their longest member (as in cluster_signatures); clusters with earlier members keep none.
    order = np.lexsort((np.arange(M), -n_chars_M, cluster_id))
    first = np.ones(M, dtype=bool)
    first[1:] = cluster_id[order][1:] != cluster_id[order][:-1]
    kept = np.zeros(M, dtype=bool)
    kept[order[first]] = True
    kept &= ~has_old
    earlier = [representative[int(c)] if h else None for c, h in zip(cluster_id, has_old)]
    n_dup = int(own.n_duplicate_pairs + len(pairs))
    result = Clusters(cluster_id, np.array([sizes[int(c)] for c in cluster_id], dtype=np.int32), kept,
                      own.n_candidate_pairs + len(similar), n_dup)  # fmt: skip
    return IndexedClusters(result, earlier, merges)


def _own_edges(own: Clusters):
    """Edges joining each new document to its cluster's first member (the clusters of the drop on its own)."""
    members = np.arange(len(own.cluster_id))
    other = own.cluster_id != members
    if other.any():
        yield own.cluster_id[other], members[other]


def index_table(ids, n_chars, clusters: Clusters, sig_MK: np.ndarray, config: NearDedupConfig, first_position: int):
    bands, rows = config.lsh_params()
    M, K = sig_MK.shape
    keys = band_keys(sig_MK, bands, rows)
    schema = pa.schema([*INDEX_SCHEMA_FIELDS, pa.field("signature", pa.list_(pa.uint32(), K), nullable=False),
                        pa.field("band_keys", pa.list_(pa.uint64(), bands), nullable=False)])  # fmt: skip
    return pa.Table.from_arrays(
        [
            pa.array(first_position + np.arange(M), pa.int64()),
            pa.array(ids, pa.string()),
            pa.array(n_chars, pa.int64()),
            pa.array(clusters.cluster_id, pa.int64()),
            pa.array(clusters.kept, pa.bool_()),
            pa.FixedSizeListArray.from_arrays(pa.array(sig_MK.ravel(), pa.uint32()), K),
            pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel(), pa.uint64()), bands),
        ],
        schema=schema,
    )


def near_dedup(
    inputs: list[str],
    output_dir: str | Path,
    config: NearDedupConfig | None = None,
    log: logging.Logger | None = logger,
    index_dir: str | Path | None = None,
    partition: str = "",
) -> StageStats:
    """Near-dedup `inputs`; with `index_dir`, as drop `partition` against the MinHash index of the drops before it
    (`cluster_against_index`), adding this drop to the index."""
    config = config or NearDedupConfig()
    config.lsh_params()  # bad settings fail before any work
    started = time.monotonic()
    output_dir = Path(output_dir)
    index = PartitionIndex(index_dir, "minhash", index_params(config)) if index_dir is not None else None
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
        workers=workers_for(config.workers, total, config.inline_below),
    ):
        ids.extend(d.id for d in batch)
        n_chars.extend(len(d.text) for d in batch)
        signatures.append(sig)
    sig_NK = np.concatenate(signatures) if signatures else np.empty((0, config.num_perm), dtype=np.uint32)
    n_chars_N = np.asarray(n_chars, dtype=np.int64)
    if index is None:
        clusters, earlier, merges = cluster_signatures(sig_NK, n_chars_N, config), [None] * len(ids), []
        offset = 0
    else:
        indexed = cluster_against_index(sig_NK, n_chars_N, index, partition, config)
        clusters, earlier, merges = indexed.clusters, indexed.earlier_representative, indexed.merges
        offset = index.first_position(partition)
    if log is not None:
        log.info(
            f"{STAGE}: {clusters.n_candidate_pairs} candidate pairs, {clusters.n_duplicate_pairs} above "
            f"{config.threshold}, {int((~clusters.kept).sum())} of {len(ids)} documents are near-duplicates"
        )

    # Pass 2: write the representatives; ledger every record in input order.
    ledger = Ledger(STAGE, partition)
    bytes_in = 0
    position = 0
    representative = dict(zip(clusters.cluster_id[clusters.kept].tolist(), np.flatnonzero(clusters.kept).tolist()))
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
                rep, rep_drop = earlier[position] or (ids[representative[cid]], partition)
                where = f" in drop {rep_drop}" if rep_drop != partition else ""
                ledger.dropped(record.id, f"near_duplicate:{cid}", f"cluster of {size}, kept {rep}{where}",
                               record.location, duplicate_of=rep, duplicate_partition=rep_drop)  # fmt: skip
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
    if index is not None:
        extra["index"] = index_record(index, partition, inputs)
        extra["n_merged_clusters"] = len(merges)
    stats = finish_stage(output_dir, ledger, started, files, bytes_in=bytes_in, bytes_kept=writer.n_bytes, extra=extra)
    if index is not None:  # after the outputs: an index never holds a drop whose outputs failed to be written
        index.put(partition, index_table(ids, n_chars_N, clusters, sig_NK, config, offset), ids, merges)
    return stats


def rerun_partition(record: dict, output_dir: Path, index_dir: Path) -> StageStats:
    """Re-run one drop as its stats.json recorded it (`pipelines.dedup_index.rebuild`)."""
    params = record["params"]
    config = NearDedupConfig(threshold=params["threshold"], n_gram=params["n_gram"], num_perm=params["num_perm"],
                             bands=params["bands"], rows=params["rows"], seed=params["seed"])  # fmt: skip
    return near_dedup(record["inputs"], output_dir, config, log=None, index_dir=index_dir,
                      partition=record["partition"])  # fmt: skip


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
