"""The moe_model and dense_baseline_model assets: DeepSpeed runs launched through Dagster Pipes."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from assets.resources import CurationPaths
from assets.training import TrainAssetConfig, dense_baseline_model, moe_model, tokenizer, train_config
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.assets.conftest import TINY, materialize, metadata_of
from tests.conftest import prose, write_jsonl
from training.launch import prepare_run_dir
from training.metrics import read_metrics

# DeepSpeed trainings
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_models_train_through_pipes_and_report_metrics(trained):
    data_dir, instance, result = trained.data_dir, trained.instance, trained.result
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 3 and all(e.passed for e in evaluations), [e.metadata for e in evaluations]
    moe, dense = metadata_of(result, "moe_model"), metadata_of(result, "dense_baseline_model")
    for meta, name in ((moe, "moe_model"), (dense, "dense_baseline_model")):
        records = read_metrics(data_dir / name)
        assert len(records) == 16
        # reported by the training process (rounded to 4 digits in the metadata)
        assert meta["val_loss"].value == pytest.approx(records[-1]["val_loss"], rel=1e-3)
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


def test_the_tokenizer_is_kept_when_the_shards_change_unless_asked(data_dir):
    """New drops change the shards; the tokenizer (and so every model trained with it) stays unless retrain."""
    config = {"vocab_size": 512}
    first = metadata_of(materialize(data_dir, [tokenizer], config), "tokenizer")
    trained = (data_dir / "tokenizer" / "tokenizer.json").read_bytes()
    rows = [{"id": f"new{i}", "text": prose(100 + i, 60), "quality_score": 0.9} for i in range(40)]
    build_curriculum([str(write_jsonl(data_dir.parent / "more.jsonl", rows))], data_dir / "curriculum_shards",
                     CurriculumConfig(target_shard_bytes=8000))  # fmt: skip
    kept = metadata_of(materialize(data_dir, [tokenizer], config), "tokenizer")
    assert first["retrained"].value is True and kept["retrained"].value is False
    assert (data_dir / "tokenizer" / "tokenizer.json").read_bytes() == trained
    again = metadata_of(materialize(data_dir, [tokenizer], {**config, "retrain": True}), "tokenizer")
    assert again["retrained"].value is True and again["n_documents"].value == 40
    resized = metadata_of(materialize(data_dir, [tokenizer], {"vocab_size": 600}), "tokenizer")
    assert resized["retrained"].value is True and resized["vocab_size"].value <= 600  # other settings: trained


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


def test_the_moe_run_gets_the_mtp_settings_and_the_dense_ones_do_not(tmp_path):
    paths = CurationPaths(data_dir=str(tmp_path))
    config = TrainAssetConfig(**TINY, mtp_depth=2, mtp_distill_weight=0.25)
    moe = train_config(config, paths, "moe_model", dense=False)
    assert moe.model.mtp_depth == 2 and moe.mtp_distill_weight == 0.25
    dense = train_config(config, paths, "dense_baseline_model", dense=True)
    assert dense.model.mtp_depth == 0 and dense.mtp_distill_weight == 0.0
    plain = train_config(TrainAssetConfig(**TINY, mtp_depth=0), paths, "moe_model", dense=False)
    assert plain.model.mtp_depth == 0 and plain.mtp_distill_weight == 0.0


def test_the_data_schedule_and_learning_rate_reach_the_run_config(tmp_path):
    paths = CurationPaths(data_dir=str(tmp_path))
    default = train_config(TrainAssetConfig(**TINY), paths, "moe_model", dense=False)
    assert default.data.mix_schedule is not None and default.data.bucket_schedule is None  # random order
    anneal = train_config(
        TrainAssetConfig(**TINY, data_schedule="quality_anneal", lr_schedule="wsd", decay_fraction=0.25),
        paths, "moe_model", dense=False,
    )  # fmt: skip
    stable, decay = anneal.data.mix_schedule
    assert stable.until == 0.75 and decay.quality_tiers == [-1] and anneal.lr_schedule == "wsd"
    assert anneal.decay_start == anneal.max_steps * 3 // 4
    ordered = train_config(
        TrainAssetConfig(**TINY, data_schedule="curriculum", bucket_schedule=[2, 0]), paths, "moe_model", dense=False
    )
    assert ordered.data.bucket_schedule == [2, 0] and ordered.data.mix_schedule is None
    with pytest.raises(ValueError, match="set data_schedule to curriculum"):
        train_config(TrainAssetConfig(**TINY, bucket_schedule=[0]), paths, "moe_model", dense=False)
    with pytest.raises(ValueError, match="data_schedule must be one of"):
        train_config(TrainAssetConfig(**TINY, data_schedule="sorted"), paths, "moe_model", dense=False)
