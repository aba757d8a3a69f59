"""The Definitions load as `dagster` loads them, and the UI serves them on 127.0.0.1."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from assets.definitions import defs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def dagster_env(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    return {**os.environ, "DAGSTER_HOME": str(home), "FRUGAL_DATA_DIR": str(tmp_path / "data")}


def test_graph_has_the_curation_assets_in_order():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"raw_documents", "clean_documents", "near_dedup_documents", "document_ledger"} <= keys
    parents = {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()
    }
    assert parents["clean_documents"] == {"raw_documents"}
    assert parents["near_dedup_documents"] == {"clean_documents"}


def test_definitions_validate(dagster_env):
    result = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "assets.definitions"],
        cwd=ROOT,
        env=dagster_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_assets_on_loopback(dagster_env):
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-m", "assets.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=dagster_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so we stop exactly what we started
    )
    try:
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                query = b'{"query": "{ assetNodes { assetKey { path } } }"}'
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql", data=query, headers={"Content-Type": "application/json"}
                )
                body = urllib.request.urlopen(request, timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, server.stderr.read().decode() if server.poll() is not None else "no answer in 90 s"
        assert '"near_dedup_documents"' in body and '"document_ledger"' in body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_bench_run_config_fits_the_graph():
    """bench/cost.yaml (make bench-cost, make demo-full) names real assets and fields with valid values: a renamed
    field fails here, not after an hour of training."""
    import dagster as dg
    import yaml

    from tests.conftest import ROOT

    config = yaml.safe_load((ROOT / "bench" / "cost.yaml").read_text())
    validated = dg.validate_run_config(defs.resolve_implicit_global_asset_job_def(), config)
    assert validated["ops"]["dense_scaling"]["config"]["noise_size"] is None
    assert validated["ops"]["benchmark_report"]["config"]["compile_autotune"] is True
    with pytest.raises(dg.DagsterInvalidConfigError, match="noise_sizes"):
        dg.validate_run_config(defs.resolve_implicit_global_asset_job_def(),
                               {"ops": {"dense_scaling": {"config": {"noise_sizes": 1}}}})  # fmt: skip
