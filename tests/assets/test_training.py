"""The moe_model and dense_baseline_model assets: DeepSpeed runs launched through Dagster Pipes."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from assets.inference import INFERENCE_CHECKS, benchmark_report, inference_package, quantized_model
from assets.resources import CurationPaths, WandbResource
from assets.training import (
    TRAINING_CHECKS,
    TrainAssetConfig,
    dense_baseline_model,
    draft_model,
    moe_model,
    train_config,
)
from inference import demo
from model.tokenizer import TokenizerConfig, train_tokenizer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl
from training.launch import prepare_run_dir
from training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = {"preset": "debug_tiny", "max_steps": 16, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "eval_every": 8}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """What curriculum_shards and tokenizer leave under the data folder."""
    data = tmp_path / "data"
    rows = [{"id": f"d{i:03d}", "text": prose(i % 37, 40 + i % 50), "quality_score": (i % 10) / 10} for i in range(200)]
    src = write_jsonl(tmp_path / "scored.jsonl", rows)
    build_curriculum([str(src)], data / "curriculum_shards", CurriculumConfig(target_shard_bytes=8000))
    train_tokenizer(data / "curriculum_shards", data / "tokenizer", TokenizerConfig(vocab_size=512))
    return data


def materialize(
    data_dir: Path, assets: list, config: dict, raise_on_error: bool = True, instance=None, checks=(), configs=None
):
    """configs: a config per asset, where it differs from `config`."""
    configs = configs or {}
    return dg.materialize(
        [*assets, *checks],
        instance=instance,
        resources={
            "paths": CurationPaths(data_dir=str(data_dir)),
            "wandb": WandbResource(mode="offline", dir=str(data_dir.parent)),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
        run_config={"ops": {a.key.to_user_string(): {"config": configs.get(a, config)} for a in assets}},
        raise_on_error=raise_on_error,
    )


def metadata_of(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return event.materialization.metadata


def test_the_models_train_through_pipes_and_report_metrics(data_dir, capsys):
    instance = dg.DagsterInstance.ephemeral()
    checks = TRAINING_CHECKS[1:]  # the exported model, reloaded, reproduces the reported validation loss
    assets = [moe_model, dense_baseline_model, draft_model]
    draft_config = {**TINY, "preset": "debug_tiny_draft"}
    result = materialize(data_dir, assets, TINY, instance=instance, checks=checks, configs={draft_model: draft_config})
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 3 and all(e.passed for e in evaluations), [e.metadata for e in evaluations]
    moe, dense = metadata_of(result, "moe_model"), metadata_of(result, "dense_baseline_model")
    for meta, name in ((moe, "moe_model"), (dense, "dense_baseline_model")):
        records = read_metrics(data_dir / name)
        assert len(records) == 16
        assert meta["val_loss"].value == pytest.approx(records[-1]["val_loss"])  # reported by the training process
        assert meta["step"].value == 16 and meta["tokens"].value == 16 * 4 * 32
        assert "data:image/png;base64," in meta["loss_curve"].value
        assert (data_dir / name / "model.safetensors").exists()
    assert "expert_load_max_over_mean" in moe and "expert_load_max_over_mean" not in dense
    # equal active parameters per token, more parameters in total for the MoE
    assert dense["active_params"].value == pytest.approx(moe["active_params"].value, rel=0.01)
    assert moe["total_params"].value > dense["total_params"].value
    # progress lines from the training process reached the Dagster event log
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("step 8/16" in m and "loss" in m for m in messages)

    # quantized_model: INT8 and INT4 target and draft, perplexities against fp32, and its checks
    config = {"group_size": 32, "calibration_rows": 8, "val_rows": 8}
    result = materialize(data_dir, [quantized_model], config, instance=instance, checks=INFERENCE_CHECKS)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["speculative_greedy_is_identical"].passed
    assert "quantization_within_budget" in evaluations  # an untrained tiny model need not meet the budgets
    report = json.loads((data_dir / "quantized_model" / "report.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels[:4] == ["fp32", "bf16", "int8", "int4"] and "int8 kv (per channel)" in labels
    by_label = {r["label"]: r for r in report["rows"]}
    assert by_label["int4"]["weight_bytes"] < by_label["int8"]["weight_bytes"] < by_label["fp32"]["weight_bytes"]
    assert report["awq"]["int4/target"]["matrices_calibrated"] > 0
    assert "int4 g32 asym AWQ" in metadata_of(result, "quantized_model")["perplexity"].value

    # benchmark_report and inference_package: the report, its BENCHMARKS section, the release
    benchmarks_md = data_dir.parent / "BENCHMARKS.md"
    benchmarks_md.write_text("# Benchmarks\n\nearlier sections\n")
    releases = data_dir.parent / "releases"
    configs = {
        benchmark_report: {"prompts": 2, "new_tokens": 6, "benchmarks_md": str(benchmarks_md)},
        inference_package: {"releases_dir": str(releases), "kv_cache": "int8-channel"},
    }
    result = materialize(data_dir, [benchmark_report, inference_package], {}, instance=instance, configs=configs)
    report = json.loads((data_dir / "benchmark_report" / "report.json").read_text())
    assert [(r["config"], r["decoding"]) for r in report["rows"]] == [
        ("dense fp32", "plain"),
        *[(f"moe {f}", d) for f in ("fp32", "int8", "int4") for d in ("plain", "speculative")],
    ]
    assert all(r["identical"] for r in report["rows"] if r["decoding"] == "speculative")
    meta = metadata_of(result, "benchmark_report")
    assert "data:image/png;base64," in meta["chart"].value and meta["cost_ratio"].value > 0
    published = benchmarks_md.read_text()
    assert published.startswith("# Benchmarks\n\nearlier sections") and "| moe int4 | speculative |" in published
    release = releases / "frugal-small-cpu-0.1.0"
    assert (release / "frugal_small_cpu-0.1.0-py3-none-any.whl").exists()
    assert (release / "frugal_small_cpu-0.1.0.tar.gz").exists()
    card = (release / "package" / "MODEL_CARD.md").read_text()
    assert "curriculum_shards/manifest.json` sha256" in card and "| moe int4 | speculative |" in card

    # the demo's ending: the benchmark table, then the package decodes the same greedy text with and without the draft
    demo.main(["--releases", str(releases), "--report", str(data_dir / "benchmark_report" / "report.md")])
    out = capsys.readouterr().out
    assert "| dense fp32 | plain |" in out and "verified against its manifest" in out
    assert out.count("identical: True") == len(demo.PROMPTS) and "acceptance rate" in out


def test_a_terminated_run_resumes_from_its_checkpoint(data_dir):
    config = {**TINY, "max_steps": 200, "checkpoint_every": 1000}
    cfg = train_config(TrainAssetConfig(**config), CurationPaths(data_dir=str(data_dir)), "moe_model", dense=False)
    prepare_run_dir(cfg)  # what the asset does, then a run that Dagster terminated (SIGTERM) mid-way
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.train", "--config", str(Path(cfg.run_dir) / "train_config.json")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stopped_at = len(read_metrics(Path(cfg.run_dir)))
    assert stopped_at < 200

    result = materialize(data_dir, [moe_model], config)
    meta = metadata_of(result, "moe_model")
    assert meta["resumed"].value is True and meta["step"].value == 200
    assert [r["step"] for r in read_metrics(Path(cfg.run_dir))] == list(range(1, 201))


def test_a_crashed_rank_fails_the_asset_with_the_rank_logs(data_dir):
    config = {**TINY, "max_steps": 100000, "world_size": 2, "ep_size": 2, "checkpoint_every": 100000}
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.setdefault("result", materialize(data_dir, [moe_model], config, raise_on_error=False))
    )
    thread.start()
    metrics = data_dir / "moe_model" / "metrics.jsonl"
    deadline = time.time() + 180
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.05)
    ranks = [
        p for p in psutil.Process().children(recursive=True) if "training.train" in " ".join(p.cmdline())
        and "torch.distributed.run" not in " ".join(p.cmdline())
    ]  # fmt: skip
    assert len(ranks) == 2
    max(ranks, key=lambda p: p.pid).kill()
    thread.join(timeout=180)
    result = outcome["result"]
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = str(failure.event_specific_data.error)
    assert "rank0.log" in message and "rank1.log" in message and "resume" in message


def test_bad_configs_fail_before_launching(data_dir):
    result = materialize(data_dir, [moe_model], {**TINY, "zero_stage": 3}, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "zero_stage=3 cannot train DeepSpeed MoE" in str(failure.event_specific_data)
    assert not (data_dir / "moe_model" / "logs").exists()
    (data_dir / "tokenizer" / "tokenizer.json").write_text(json.dumps({"broken": True}))
    result = materialize(data_dir, [dense_baseline_model], TINY, raise_on_error=False)
    assert not result.success
