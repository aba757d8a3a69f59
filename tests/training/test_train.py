"""Training runs on the tiny preset, each a real `python -m training.train` process (DeepSpeed, gloo)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model.io import load_model
from model.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from pipelines.curriculum import CurriculumConfig, build_curriculum
from tests.conftest import prose, write_jsonl
from training.config import TrainConfig
from training.data import PackedLoader, validation_rows
from training.launch import continuation_start
from training.metrics import read_metrics
from training.train import main

pytestmark = pytest.mark.slow  # DeepSpeed trainings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Curriculum shards (several buckets) and a 512-token tokenizer."""
    d = tmp_path_factory.mktemp("train")
    rows = [{"id": f"d{i:03d}", "text": prose(i % 37, 30 + i % 50), "quality_score": (i % 10) / 10} for i in range(300)]
    build_curriculum(
        [str(write_jsonl(d / "scored.jsonl", rows))], d / "shards", CurriculumConfig(target_shard_bytes=8000)
    )
    train_tokenizer(d / "shards", d / "tok", TokenizerConfig(vocab_size=512))
    return d


def write_config(inputs: Path, run_dir: Path, **changes) -> Path:
    doc = {
        "model": {"preset": "debug_tiny"},
        "data": {"seq_len": 32, "batch_size": 8, "validation_fraction": 0.1},
        "shard_dir": str(inputs / "shards"),
        "tokenizer_path": str(inputs / "tok" / "tokenizer.json"),
        "run_dir": str(run_dir),
        "max_steps": 12, "warmup_steps": 2, "checkpoint_every": 5, "eval_every": 6, "log_every": 5,
        "val_tokens_per_bucket": 1024, "peak_flops": 1e10, "threads_per_rank": 1,
    }  # fmt: skip
    for key, value in changes.items():
        if isinstance(value, dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path = run_dir.parent / f"{run_dir.name}.json"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def start(config: Path, nice: int = 0) -> subprocess.Popen:
    """nice: the training's scheduling priority lowered, so that a test polling its progress under load (another
    xdist worker) sees it before the run ends (the numbers do not depend on it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "training.train", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )  # fmt: skip


def train(config: Path, timeout: float = 240) -> str:
    proc = start(config)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def test_training_lowers_the_loss_and_exports_a_model_that_reloads(inputs, tmp_path):
    run_dir = tmp_path / "run"
    out = train(write_config(inputs, run_dir, max_steps=40, eval_every=20, checkpoint_every=10))
    assert "step 40/40" in out and "val" in out
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert abs(records[0]["loss"] - math.log(512)) < 0.5
    assert sum(losses(run_dir)[-5:]) / 5 < records[0]["loss"] - 1.0
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [20, 40] and val[1]["val_loss"] < val[0]["val_loss"] < math.log(512)
    last = records[-1]
    assert last["tokens"] == 40 * 8 * 32 and last["active_experts_per_token"] == 2.0  # fixed top-2
    assert last["dropped_route_fraction"] == 0.0  # no capacity limit
    assert last["tokens_per_s"] > 0 and last["mfu"] > 0 and last["device_hours"] > 0
    assert last["spend_usd"] == pytest.approx(last["device_hours"] * 0.05)
    assert last["usd_per_1m_tokens"] == pytest.approx(last["spend_usd"] / last["tokens"] * 1e6)
    assert last["expert_load_max_over_mean/layer0"] >= 1.0 and last["router_bias_norm/layer0"] > 0
    buckets = [k for k in last if k.startswith("val_loss/bucket")]
    assert len(buckets) == len(json.loads((inputs / "shards" / "manifest.json").read_text())["buckets"]) > 1
    assert last["val_expert_load_max_over_mean"] >= 1.0 and last["expert_load_max_over_mean_window"] >= 1.0

    # only the last two checkpoints are kept; the exported model is complete
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_0000030", "step_0000040"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "summary.json", "loss_curve.png"} <= {
        p.name for p in run_dir.iterdir()
    }

    # the exported weights, loaded into the plain-torch model, give the validation losses DeepSpeed reported
    model = load_model(run_dir)
    cfg = TrainConfig.from_file(run_dir / "train_config.json")
    rows = validation_rows(PackedLoader(cfg.shard_dir, load_tokenizer(run_dir / "tokenizer.json"), cfg.data), cfg)
    with torch.no_grad():
        for bucket, batch in rows.items():
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
            assert loss == pytest.approx(last[f"val_loss/bucket{bucket}"], rel=1e-4)

    # W&B recorded the same run (offline), read back from its transaction log
    summary = json.loads((run_dir / "summary.json").read_text())
    [log] = Path(summary["wandb_run"]).glob("*.wandb")
    inspect = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json", str(log)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(inspect.stdout)["summary"]["val_loss"] == pytest.approx(last["val_loss"])


def test_resume_after_sigterm_gives_the_losses_of_an_uninterrupted_run(inputs, tmp_path):
    steps = 240  # long enough for SIGTERM to land mid-run: on an idle machine 60 steps ended (in ~1 s) before it did
    # with an MTP module (a MoE block) and the stepped MTP weight, which a resumed run must follow too
    # and WSD with a quality anneal: the resumed run must follow the learning rate and the mixture's phases
    mtp = {"model": {"preset": "debug_tiny", "mtp_depth": 1}, "mtp_weight_schedule": "stepped", "lr_schedule": "wsd",
           "data": {"mix_schedule": [{"until": 0.5}, {"until": 1.0, "quality_tiers": [-1]}]}}  # fmt: skip
    train(write_config(inputs, tmp_path / "whole", max_steps=steps, checkpoint_every=1000, **mtp))
    config = write_config(inputs, tmp_path / "cut", max_steps=steps, checkpoint_every=1000, **mtp)
    proc = start(config, nice=19)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM" in out
    stopped_at = len(losses(tmp_path / "cut"))
    assert 3 <= stopped_at < steps and (tmp_path / "cut" / "checkpoints" / f"step_{stopped_at:07d}").exists()
    out = train(config)
    assert "resumed from" in out and f"at step {stopped_at}" in out
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # bit-exact, every step
    mtp_losses = [[r["mtp_loss/depth1"] for r in read_metrics(tmp_path / run)] for run in ("cut", "whole")]
    assert mtp_losses[0] == mtp_losses[1]
    cut, whole = read_metrics(tmp_path / "cut"), read_metrics(tmp_path / "whole")
    mixes = [[{k: v for k, v in r.items() if k.startswith(("mix", "lr"))} for r in run] for run in (cut, whole)]
    assert mixes[0] == mixes[1]
    assert [r["mix_phase"] for r in whole] == [0] * 120 + [1] * 120
    top = json.loads((inputs / "shards" / "manifest.json").read_text())["buckets"]
    top = {b["bucket"] for b in top if b["quality_tier"] == max(x["quality_tier"] for x in top)}
    late = [r for r in whole if r["step"] > 122]  # past the boundary (a document begun before it may span a batch)
    assert all(sum(v for k, v in r.items() if k.startswith("mix/bucket") and int(k[10:]) not in top) == 0 for r in late)
    assert whole[150]["lr"] == pytest.approx(3e-3) and whole[-1]["lr"] == pytest.approx(3e-4)  # stable, then decayed


def test_expert_parallel_ranks_match_data_parallel_ranks_and_one_rank(inputs, tmp_path):
    runs = {
        "one": {},
        "dp2": {"world_size": 2},
        "ep2": {"world_size": 2, "ep_size": 2},
    }
    mtp = {"model": {"preset": "debug_tiny", "mtp_depth": 1}}  # its MoE block's experts are split too
    for name, changes in runs.items():
        train(write_config(inputs, tmp_path / name, **changes, **mtp))
    one, dp2, ep2 = (losses(tmp_path / name) for name in runs)
    assert len(one) == 12
    assert ep2 == pytest.approx(dp2, rel=1e-5) and dp2 == pytest.approx(one, rel=1e-5)
    # both ep ranks' experts were gathered into one exported model
    ep_model, one_model = load_model(tmp_path / "ep2"), load_model(tmp_path / "one")
    torch.testing.assert_close(ep_model.state_dict(), one_model.state_dict(), rtol=1e-4, atol=1e-5)


def test_a_killed_rank_fails_the_run_and_shows_the_rank_logs(inputs, tmp_path):
    config = write_config(inputs, tmp_path / "run", world_size=2, max_steps=100000, checkpoint_every=100000)
    proc = start(config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "training.train" in " ".join(p.cmdline())]
    victim = max(ranks, key=lambda p: p.pid)  # a rank process (torchrun starts them last)
    victim.kill()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "training failed" in out and "rank logs" in out and "rank0.log" in out and "rank1.log" in out
    assert not psutil.pid_exists(victim.pid) or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shard_dir": "/nowhere/shards"}, "no manifest"),
        ({"model": {"vocab_size": 1024}}, "vocab_size=1024"),
        ({"zero_stage": 3}, "zero_stage=3 cannot train DeepSpeed MoE"),
        ({"world_size": 2, "ep_size": 2, "model": {"n_routed_experts": 3, "top_k": 2}}, "not divisible by ep_size"),
        ({"tokenizer_path": "/nowhere/tokenizer.json"}, "tokenizer not found"),
        ({"distill_from": "/nowhere/teacher"}, "/nowhere/teacher/config.json: missing"),
        ({"distill_weight": 1.5}, "distill_weight=1.5 must be in [0, 1]"),
        ({"model": {"mtp_depth": -1}}, "mtp_depth must be in [0, max_seq_len - 1 = 63), got -1"),
        ({"model": {"mtp_depth": 32}}, "model.mtp_depth=32 leaves no position to train"),
        ({"mtp_weight_schedule": "cosine"}, "mtp_weight_schedule must be constant or stepped"),
        ({"mtp_distill_weight": 2.0}, "mtp_distill_weight=2.0 must be in [0, 1]"),
        ({"lr_schedule": "wsd", "decay_fraction": 1.0}, "decay_fraction=1.0 must be in (0, 1)"),
        (
            {"data": {"mix_schedule": [{"until": 1.0, "weights": {"9": 1.0}}]}},
            "data.mix_schedule[0].weights names bucket(s) [9]",
        ),
        ({"data": {"mix_schedule": [{"until": 1.0, "weights": {"0": 0}}]}}, "sum to a positive number"),
        ({"data": {"mix_schedule": [{"until": 1.0, "quality_tiers": [7]}]}}, "data.mix_schedule[0].quality_tiers"),
    ],
)
def test_bad_inputs_are_refused_before_anything_starts(inputs, tmp_path, capsys, changes, message):
    run_dir = tmp_path / "run"
    assert main(["--config", str(write_config(inputs, run_dir, **changes))]) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()  # nothing was launched or written


def test_mtp_modules_train_log_each_depth_and_export_with_the_model(inputs, tmp_path):
    run_dir = tmp_path / "run"
    train(write_config(inputs, run_dir, max_steps=40, eval_every=20, checkpoint_every=100,
                       model={"preset": "debug_tiny", "mtp_depth": 2}, mtp_weight_schedule="stepped",
                       mtp_weight_step_fraction=0.5))  # fmt: skip
    records = read_metrics(run_dir)
    first, last = records[0], records[-1]
    for k in (1, 2):
        assert abs(first[f"mtp_loss/depth{k}"] - math.log(512)) < 0.5  # untrained: near uniform
        assert last[f"mtp_loss/depth{k}"] < first[f"mtp_loss/depth{k}"] - 1.0
        assert 0 <= last[f"mtp_accuracy/depth{k}"] <= 1 and 0 <= last[f"mtp_agreement/depth{k}"] <= 1
        assert f"val_mtp_loss/depth{k}" in last and f"val_mtp_agreement/depth{k}" in last
    assert [r["mtp_weight"] for r in records[:20]] == [0.3] * 20 and records[20]["mtp_weight"] == 0.1
    # the MTP blocks (MoE) balance beside the main MoE layer: layer1 and layer2 are the two modules'
    assert "expert_load_max_over_mean/layer2" in last
    # the exported model carries the modules; plain torch gives the held-out MTP losses DeepSpeed reported
    model = load_model(run_dir)
    assert len(model.mtp) == 2
    cfg = TrainConfig.from_file(run_dir / "train_config.json")
    rows = validation_rows(PackedLoader(cfg.shard_dir, load_tokenizer(run_dir / "tokenizer.json"), cfg.data), cfg)
    from training.train import mtp_losses

    with torch.no_grad():
        sums = torch.zeros(2)
        for batch in rows.values():
            _, mtp_logits = model(batch[:, :-1], with_mtp=True)
            sums += torch.stack([m.ce for m in mtp_losses(mtp_logits, batch[:, 1:])]) * len(batch)
    n = sum(len(b) for b in rows.values())
    assert (sums / n).tolist() == pytest.approx([last["val_mtp_loss/depth1"], last["val_mtp_loss/depth2"]], rel=1e-4)


def test_self_distilled_mtp_agrees_with_the_main_head_more_often(inputs, tmp_path):
    """mtp_distill_weight teaches the modules the main head's distribution (what speculation accepts) instead of
    the data's alone: on the same tokens and seed, the held-out agreement of depth 1 with the main head rises."""
    agreement = {}
    for w in (0.0, 0.9):
        run_dir = tmp_path / f"w{w}"
        train(write_config(inputs, run_dir, max_steps=40, eval_every=40, checkpoint_every=100,
                           model={"preset": "debug_tiny", "mtp_depth": 1}, mtp_distill_weight=w))  # fmt: skip
        agreement[w] = read_metrics(run_dir)[-1]["val_mtp_agreement/depth1"]
    assert agreement[0.9] > agreement[0.0] + 0.05, agreement


def test_empty_shards_are_refused(inputs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((inputs / "shards" / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "n_rows": 0}))
    assert main(["--config", str(write_config(inputs, tmp_path / "run", shard_dir=str(empty)))]) == 2
    assert "hold no documents" in capsys.readouterr().err


def test_zero2_and_bf16_train_like_zero1_fp32(inputs, tmp_path):
    runs = {"zero1": {}, "zero2": {"zero_stage": 2}, "bf16": {"precision": "bf16"}}
    mtp = {"model": {"preset": "debug_tiny", "mtp_depth": 1}}  # the MTP block's parameters are partitioned too
    for name, changes in runs.items():
        train(write_config(inputs, tmp_path / name, **changes, **mtp))
    zero1, zero2, bf16 = (losses(tmp_path / name) for name in runs)
    assert zero2 == pytest.approx(zero1, rel=1e-4)  # one rank: partitioning changes nothing in the maths
    assert bf16 == pytest.approx(zero1, rel=2e-2) and bf16 != zero1  # bf16 compute: close, not identical
    exported = load_file(str(tmp_path / "bf16" / "model.safetensors"))  # exported in fp32 whatever the training
    assert {t.dtype for t in exported.values()} == {torch.float32}


def test_a_distilled_draft_moves_toward_its_teacher(inputs, tmp_path):
    """A draft trained with the teacher's distributions in its loss ends closer to the teacher (KL on
    held-out rows) than the same draft trained on the data alone."""
    teacher_dir = tmp_path / "teacher"
    train(write_config(inputs, teacher_dir, max_steps=16))
    draft = {"model": {"preset": "debug_tiny_draft"}, "max_steps": 24}
    train(write_config(inputs, tmp_path / "plain", **draft))
    train(write_config(inputs, tmp_path / "distilled", **draft, distill_from=str(teacher_dir), distill_weight=0.9))
    records = read_metrics(tmp_path / "distilled")
    kl = [r["distill_kl"] for r in records]
    assert len(kl) == 24 and all(math.isfinite(k) and k >= 0 for k in kl)
    assert sum(kl[-4:]) < sum(kl[:4])
    assert "distill_kl" not in read_metrics(tmp_path / "plain")[0]

    cfg = TrainConfig.from_file(tmp_path / "teacher.json")
    rows = torch.cat(
        list(validation_rows(PackedLoader(cfg.shard_dir, load_tokenizer(cfg.tokenizer_path), cfg.data), cfg).values())
    )
    teacher = load_model(teacher_dir)

    def kl_to_teacher(run: str) -> float:
        with torch.no_grad():
            p = F.log_softmax(teacher(rows[:, :-1]), -1).flatten(0, 1)
            q = F.log_softmax(load_model(tmp_path / run)(rows[:, :-1]), -1).flatten(0, 1)
        return F.kl_div(q, p, log_target=True, reduction="batchmean").item()

    assert kl_to_teacher("distilled") < kl_to_teacher("plain")


def test_a_continued_run_starts_from_the_last_runs_weights(inputs, tmp_path):
    """continuation_start snapshots the finished run; a run with init_from starts at the loss the first one ended
    near, far below a fresh start, with a fresh schedule of its own."""
    run = tmp_path / "moe"
    train(write_config(inputs, run, max_steps=16))
    first = losses(run)
    start = continuation_start(run)
    assert (start / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    train(write_config(inputs, run, max_steps=8, init_from=str(start)))
    continued = losses(run)
    assert len(continued) == 8 and continued[0] < first[0] - 0.5 and continued[0] < first[-1] + 0.3
    with pytest.raises(ValueError, match="no finished run to continue from"):
        continuation_start(tmp_path / "never_trained")
