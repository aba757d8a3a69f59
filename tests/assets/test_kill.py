"""kill -9 anywhere loses nothing: `dagster asset materialize` of the demo's graph (debug presets) is killed, its
whole process group with SIGKILL, during curation, training, quantization and packaging. After each kill no file
that a later stage reads is half-written; the graph is then materialized again from the interrupted asset on, as
a user re-executes from failure (`key:ASSET+`: the asset and everything downstream). At the end: the run
completes, the ledger balances, curation outputs are byte-identical to an uninterrupted run's, training resumed
from its checkpoint (not from step 0), the release manifest verifies, no stale temp file is left, and Dagster's run
monitoring has marked every killed run failed.

Everything runs in subprocesses with their own DAGSTER_HOME; the test stops exactly the process groups it
started. Run retries are off in this instance (the test re-executes by hand); the rest is the project's
dagster.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file

from inference.runtime.package import verify
from model.io import TEMP_SUFFIX
from tests.assets.conftest import TINY, TINY_DRAFT
from tests.conftest import ROOT
from training.launch import complete_checkpoints
from training.metrics import read_metrics

pytestmark = pytest.mark.slow  # the demo's graph killed four times: minutes

BIN = Path(sys.executable).parent
CURATION = ["raw_documents", "clean_documents", "near_dedup_documents", "filtered_documents", "scored_documents"]
CURATION_OUTPUTS = [*CURATION, "quality_classifier", "curriculum_shards", "document_ledger", "tokenizer"]
MOE_STEPS, CHECKPOINT_EVERY = 120, 40  # debug_tiny trains ~100 steps/s: a window of ~0.4 s per kill


def run_config(releases: Path) -> dict:
    ops = {
        "raw_documents": {"sample_documents": 300},
        "clean_documents": {"workers": 1},
        "near_dedup_documents": {"workers": 1},
        "quality_classifier": {"epoch": 10, "measure_transfer": False, "max_per_domain": 150},
        "curriculum_shards": {"target_shard_bytes": 50_000},
        "tokenizer": {"vocab_size": 512},
        "moe_model": {**TINY, "max_steps": MOE_STEPS, "checkpoint_every": CHECKPOINT_EVERY, "eval_every": 40},
        "dense_baseline_model": TINY,
        "draft_model": TINY_DRAFT,
        "quantized_model": {"group_size": 32, "calibration_rows": 8, "val_rows": 8},
        "inference_package": {"releases_dir": str(releases), "scheme": "int8"},
    }
    return {"ops": {name: {"config": config} for name, config in ops.items()}}


class Workspace:
    """A DAGSTER_HOME and a data folder of its own, and the `dagster` commands run against them."""

    def __init__(self, root: Path):
        self.root, self.data, self.releases = root, root / "data", root / "releases"
        home = root / "dagster_home"
        home.mkdir(parents=True)
        instance = yaml.safe_load((ROOT / "dagster.yaml").read_text())
        instance["run_retries"] = {"enabled": False}
        instance["storage"] = {"sqlite": {"base_dir": str(home)}}  # the path itself, so this process can open it
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
        self.env = {
            **os.environ, "DAGSTER_HOME": str(home), "FRUGAL_DATA_DIR": str(self.data),
            "FRUGAL_WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        self.killed_runs: list[str] = []

    def materialize(
        self, select: str, kill_when: Callable[[], bool] | None = None, timeout: float = 600, drop: str | None = None
    ) -> str:
        """'completed', or 'killed' once kill_when() held and the whole process group got SIGKILL. drop: the input
        drop, when `select` holds partitioned curation assets."""
        log = open(self.root / "materialize.log", "a")  # noqa: SIM115 (closed below, after the process ends)
        if drop is not None:
            subprocess.run([str(BIN / "python"), "-m", "assets.drops", "add", drop], cwd=ROOT, env=self.env,
                           check=True, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        proc = subprocess.Popen(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "assets.definitions", "--select", select,
             "--config-json", json.dumps(run_config(self.releases)), *(["--partition", drop] if drop else [])],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if kill_when is not None and kill_when():
                    run_ids = self.run_ids()
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
                    self.killed_runs.append(run_ids[0])  # the newest run: the one just killed
                    return "killed"
                assert time.monotonic() < deadline, f"materialize {select} ran past {timeout} s"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        assert proc.returncode == 0, (self.root / "materialize.log").read_text()[-4000:]
        return "completed"

    def log_text(self) -> str:
        return (self.root / "materialize.log").read_text(errors="replace")

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def run_ids(self) -> list[str]:
        with self.instance() as instance:
            return [r.run_id for r in instance.get_runs()]

    def materialized(self, asset: str) -> bool:
        with self.instance() as instance:
            return instance.get_latest_materialization_event(dg.AssetKey(asset)) is not None

    def run_statuses(self) -> dict[str, str]:
        with self.instance() as instance:
            return {r.run_id: r.status.value for r in instance.get_runs()}


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f"*{TEMP_SUFFIX}") if p.name.startswith(".")] if folder.exists() else []


def assert_no_partial_files(*folders: Path) -> int:
    """Every file a later stage could read (not a dot-named temp file) is whole: it parses as its format.
    Returns how many files were checked."""
    n = 0
    for folder in folders:
        for path in (p for p in folder.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in path.relative_to(folder).parts) or "/logs/" in str(path):
                continue  # temp files and folders (ignored by every reader) and the ranks' logs
            n += 1
            name = path.name
            try:
                if name.endswith(".parquet"):
                    pq.read_table(path)
                elif name.endswith(".json"):
                    json.loads(path.read_text())
                elif name.endswith(".jsonl"):
                    [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                elif name.endswith(".safetensors"):
                    load_file(str(path))
                elif name.endswith(".png"):
                    data = path.read_bytes()
                    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
                elif name.endswith(".whl"):
                    assert zipfile.ZipFile(path).testzip() is None
                elif name.endswith(".tar.gz"):
                    with tarfile.open(path) as tar:
                        tar.getmembers()
            except Exception as e:
                raise AssertionError(f"{path} is half-written or corrupt: {e}") from e
    return n


def curation_bytes(data: Path) -> dict[str, bytes]:
    """Every curation output's bytes; JSON files without their `seconds` timings (the only field that may differ)."""

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k != "seconds"}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    out = {}
    for stage in CURATION_OUTPUTS:
        for path in sorted((data / stage).rglob("*")):  # the drops' folders and the dedup indexes too
            if path.suffix == ".png" or not path.is_file() or path.name.startswith("."):
                continue
            content = path.read_bytes()
            if path.suffix == ".json":
                content = json.dumps(untimed(json.loads(content)), sort_keys=True).encode()
            out[str(path.relative_to(data))] = content
    return out


def materialize_reference(ws: Workspace) -> dict[str, bytes]:
    """Curation and the tokenizer, uninterrupted, in-process, into the workspace's data folder (ledgers record input
    paths, so the comparison needs the same folder): their output bytes. The folder is then emptied."""
    from assets.checks import CHECKS
    from assets.definitions import defs
    from assets.drops import DROPS, SAMPLE_DROP, DropLocation
    from assets.resources import CurationPaths, WandbResource

    graph = defs.resolve_asset_graph()
    keys = {k for k in graph.get_all_asset_keys() if graph.get(k).group_name == "curation"} | {dg.AssetKey("tokenizer")}
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.key in keys]
    config = {"ops": {k: v for k, v in run_config(ws.releases)["ops"].items() if dg.AssetKey(k) in keys}}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DROPS.name, [SAMPLE_DROP])
    result = dg.materialize(
        assets,
        instance=instance,
        partition_key=SAMPLE_DROP,
        resources={
            "paths": CurationPaths(data_dir=str(ws.data)),
            "wandb": WandbResource(mode="disabled"),
            "drops": DropLocation(data_dir=str(ws.data)),
        },
        run_config=config,
    )
    assert result.success and len(CHECKS) > 0
    reference = curation_bytes(ws.data)
    shutil.rmtree(ws.data)
    return reference


def test_kill_9_at_any_stage_loses_nothing(tmp_path):
    ws = Workspace(tmp_path / "faulted")
    data = ws.data
    # what `make demo` materializes (and each rerun below, from its asset on), but for the measurements, which are
    # not kill points and whose dense_scaling study cannot be made to bracket a 120-step debug model
    graph = "not key:data_ablation and not key:dense_scaling and not key:benchmark_report"
    reference = materialize_reference(ws)

    def curation_running() -> bool:  # scored_documents' step has started (its log line, from the run's event log)
        return "scored_documents - STEP_START" in ws.log_text()

    def moe_after_a_checkpoint() -> bool:
        done = complete_checkpoints(data / "moe_model")
        return bool(done) and len(read_metrics(data / "moe_model")) > int(done[-1].name.split("_")[1]) + 1

    def quantization_mid_build() -> bool:  # the staging folder holds some quantized weights, not all
        return any((s / "int8" / "target" / "model.safetensors").exists() for s in temps(data))

    def packaging_mid_release() -> bool:  # the wheel is being built, or the package folder assembled
        return (data / "inference_package" / "wheel-src").exists() or bool(temps(ws.releases))

    assert ws.materialize(graph, curation_running, drop="sample") == "killed"
    checked = assert_no_partial_files(data)
    # Dagster's run monitoring (the daemon of `dagster dev`) runs beside the rest and marks each killed run failed
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-m", "assets.definitions"],
        cwd=ROOT, env=ws.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        assert ws.materialize(f"key:scored_documents+ and {graph}", moe_after_a_checkpoint, drop="sample") == "killed"
        checked += assert_no_partial_files(data)
        # curation outputs are byte-identical to an uninterrupted run's
        faulted = curation_bytes(data)
        assert faulted.keys() == reference.keys() and len(faulted) > 20
        assert [k for k in faulted if faulted[k] != reference[k]] == []
        resumed_from = int(complete_checkpoints(data / "moe_model")[-1].name.split("_")[1])
        assert 0 < resumed_from < MOE_STEPS
        # from the interrupted asset on; the dense baseline too if the kill came before its turn (one training at once)
        rerun = (
            "key:moe_model+"
            if ws.materialized("dense_baseline_model")
            else "(key:moe_model+ or key:dense_baseline_model+)"
        )
        assert ws.materialize(f"{rerun} and {graph}", quantization_mid_build) == "killed"
        checked += assert_no_partial_files(data)
        assert ws.materialize(f"key:quantized_model+ and {graph}", packaging_mid_release) == "killed"
        checked += assert_no_partial_files(data, ws.releases)
        assert ws.materialize("key:inference_package") == "completed"
        checked += assert_no_partial_files(data, ws.releases)
        deadline = time.monotonic() + 120
        while any(ws.run_statuses()[r] != "FAILURE" for r in ws.killed_runs) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
    statuses = ws.run_statuses()
    assert [statuses[r] for r in ws.killed_runs] == ["FAILURE"] * 4, statuses  # none stays STARTED
    assert "STARTED" not in statuses.values()

    # training resumed from the checkpoint: one continuous curve, and the log says where it started again
    assert [r["step"] for r in read_metrics(data / "moe_model")] == list(range(1, MOE_STEPS + 1))
    log = (data / "moe_model" / "logs" / "rank0.log").read_text()
    assert f"at step {resumed_from} (" in log
    with ws.instance() as instance:
        moe = instance.get_latest_materialization_event(dg.AssetKey("moe_model")).asset_materialization
        assert moe.metadata["resumed"].value is True
        balances = dg.AssetCheckKey(dg.AssetKey("document_ledger"), "ledger_balances")
        # the ledger balances: input = kept + dropped, per stage and overall (the check passed, not just ran)
        assert instance.get_latest_asset_check_evaluation_record(balances).status.value == "SUCCEEDED"
    # the release manifest verifies, and no stale temp file of a killed writer is left
    verify(ws.releases / "frugal-small-cpu-0.1.0" / "package")
    assert temps(data) == [] and temps(ws.releases) == []
    print(f"kill points: 4, all recovered, curation byte-identical to an uninterrupted run; files checked: {checked}")
