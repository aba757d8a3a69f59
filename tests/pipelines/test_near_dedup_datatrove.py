"""The datatrove scale-out path: same shingling, datatrove's four stages on the local executor."""

import json

import pyarrow.parquet as pq
import pytest

from pipelines.near_dedup import NearDedupConfig
from pipelines.near_dedup_datatrove import balanced_lsh_params, build_executors, run
from tests.conftest import prose, write_jsonl


def test_balanced_params_put_the_s_curve_at_the_threshold():
    bands, rows = balanced_lsh_params(0.8, 128)
    assert bands * rows <= 128
    midpoint = (1 / bands) ** (1 / rows)
    assert 0.75 < midpoint < 0.85


def test_local_run_clusters_near_duplicates(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    rows = [{"id": f"b{i}", "text": prose(i, 150)} for i in range(12)]
    rows += [{"id": f"n{i}", "text": prose(i, 150) + " share this page"} for i in range(4)]
    write_jsonl(data / "part-0.jsonl", rows[::2])
    write_jsonl(data / "part-1.jsonl", rows[1::2])
    run(str(data), tmp_path / "out", NearDedupConfig(), tasks=2, workers=1, glob_pattern="*.jsonl")
    kept = [json.loads(line) for p in sorted((tmp_path / "out" / "kept").glob("*.jsonl")) for line in p.open()]
    removed = [json.loads(line) for p in sorted((tmp_path / "out" / "removed").glob("*.jsonl")) for line in p.open()]
    assert len(kept) == 12 and len(removed) == 4
    clusters = {d["id"]: d["metadata"]["minhash_cluster_id"] for d in kept + removed}
    for i in range(4):
        assert clusters[f"b{i}"] == clusters[f"n{i}"] != -1
    # the ledger accounts for every input record, as every stage's does
    ledger = pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()
    assert sorted(r["id"] for r in ledger) == sorted(r["id"] for r in rows)
    assert {r["id"] for r in ledger if r["outcome"] == "kept"} == {d["id"] for d in kept}
    assert {r["reason"].split(":")[0] for r in ledger if r["outcome"] == "dropped"} == {"near_duplicate"}


def test_unknown_executor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="executor must be one of"):
        build_executors(str(tmp_path), tmp_path / "out", executor="kubernetes")
