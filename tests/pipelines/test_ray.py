"""The scale-out path on a real Ray cluster: a head node on 127.0.0.1 started by the test, near-dedup on datatrove's
RayPipelineExecutor and the filter stage on Ray actors, each equal to its local run. The test stops exactly the Ray
processes it started (the head's process group)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, prose, write_jsonl
from tests.pipelines.test_filters import ENGLISH

pytestmark = pytest.mark.slow  # a local Ray cluster

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 in a session of its own; its address. Stopped by killing that session's
    process group, and then any process still holding the cluster's temp folder (Ray's own daemons), so nothing that
    the test did not start is touched."""
    temp = tmp_path_factory.mktemp("ray")
    port = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline, "the Ray head did not start within 120 s"
        time.sleep(0.5)
    time.sleep(2)  # the raylet registers after the GCS port opens
    started = {p.pid for p in psutil.Process(head.pid).children(recursive=True)} | {head.pid}
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:  # `ray start --block` takes its daemons down slowly (30 s): the group goes now
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    for pid in started:  # Ray's daemons that left the group: only those this test started
        if psutil.pid_exists(pid):
            psutil.Process(pid).kill()
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
    for pid in leftovers:
        psutil.Process(pid).kill()


def corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"b{i}", "text": prose(i, 150)} for i in range(12)]
    rows += [{"id": f"n{i}", "text": prose(i, 150) + " share this page"} for i in range(4)]
    write_jsonl(folder / "part-0.jsonl", rows[::2])
    write_jsonl(folder / "part-1.jsonl", rows[1::2])
    return folder


def ledger(out: Path) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["outcome"], r["reason"]) for r in pq.read_table(out / "ledger.parquet").to_pylist()}


def test_near_dedup_on_datatrove_ray_executor_equals_the_local_executor(ray_cluster, tmp_path):
    data = corpus(tmp_path / "in")
    outs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.near_dedup_datatrove", "--input", str(data), "--output", str(out),
             "--executor", executor, "--tasks", "2", "--workers", "1", "--ray-address", ray_cluster],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        kept = [json.loads(line) for p in sorted((out / "kept").glob("*.jsonl")) for line in p.open()]
        outs[executor] = (ledger(out), {d["id"]: d["metadata"]["minhash_cluster_id"] for d in kept})
    assert outs["ray"] == outs["local"]
    assert sum(outcome == "dropped" for outcome, _ in outs["ray"][0].values()) == 4


def test_the_filter_stage_on_ray_actors_equals_local_processes(ray_cluster, tmp_path):
    from pipelines.filters import FilterConfig, filter_documents

    rows = [{"id": f"soup{i}", "text": prose(i, 80)} for i in range(6)]  # no language: dropped
    rows += [{"id": f"en{i}", "text": f"{ENGLISH}\n\nNote {i}: the same holds for the next release."} for i in range(6)]
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    import ray

    local = filter_documents([str(src)], tmp_path / "local", FilterConfig(workers=2, batch_docs=2), log=None)
    try:
        on_ray = filter_documents([str(src)], tmp_path / "ray",
                                  FilterConfig(workers=2, batch_docs=2, ray_address=ray_cluster), log=None)  # fmt: skip
    finally:
        ray.shutdown()  # this process's connection to the cluster (the pool's actors ended with it)
    assert (on_ray.n_in, on_ray.n_kept, on_ray.drop_reasons) == (local.n_in, local.n_kept, local.drop_reasons)
    assert ledger(tmp_path / "ray") == ledger(tmp_path / "local") and 0 < local.n_kept < local.n_in
    docs = [pq.read_table(tmp_path / d / "documents.parquet").to_pylist() for d in ("local", "ray")]
    assert docs[0] == docs[1]
