"""Starting a training run: checks that fail before anything is launched, the run folder (resume or
start fresh), the launcher command (torchrun for several ranks) and the rank logs a failure shows.

Resume rule: a run folder whose checkpoints were written by the same config and which has no
summary.json (the run did not finish) is resumed from its last complete checkpoint. A finished run, or one
made by a different config, is cleared and started again.

A checkpoint is complete once every rank has written it: rank 0 then writes `CHECKPOINT_DONE` into its tag
folder. A process killed mid-save (kill -9, OOM) leaves a tag folder without the marker, or a `latest` file
that DeepSpeed had not finished writing; resume ignores both and loads the newest complete tag by name.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from model.io import write_text_atomic
from model.tokenizer import load_tokenizer
from training.config import CONFIG_FILE, TrainConfig
from training.data import ShardReader, check_compatible, check_mixture

SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_DONE = "complete"
LOG_DIR = "logs"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint tag folders that every rank finished writing, oldest first."""
    tags = sorted(p for p in (Path(run_dir) / CHECKPOINT_DIR).glob("step_*") if p.is_dir())
    return [t for t in tags if (t / CHECKPOINT_DONE).exists()]


def check_inputs(cfg: TrainConfig) -> None:
    """Config, shards and tokenizer: a ValueError naming what is wrong, before any rank starts."""
    cfg.check()
    reader = ShardReader(cfg.shard_dir)  # missing manifest, missing or empty shards
    if cfg.data.mix_schedule is not None:
        check_mixture(cfg.data, reader)  # buckets and tiers the manifest lacks, phases with nothing to read
    if not Path(cfg.tokenizer_path).exists():
        raise ValueError(f"{cfg.tokenizer_path}: tokenizer not found: materialize the tokenizer asset first")
    check_compatible(load_tokenizer(cfg.tokenizer_path), cfg.model)
    if cfg.init_from is not None:
        from model.io import WEIGHTS_FILE, load_config

        start = load_config(Path(cfg.init_from))  # names the missing or broken config.json
        if not (Path(cfg.init_from) / WEIGHTS_FILE).exists():
            raise ValueError(f"{Path(cfg.init_from) / WEIGHTS_FILE}: missing: init_from needs a finished run")
        if start != cfg.model:
            raise ValueError(f"init_from={cfg.init_from}: its model config differs from this run's")
    if cfg.distill_from is not None:
        from model.io import WEIGHTS_FILE, load_config

        teacher = load_config(Path(cfg.distill_from))  # names the missing or broken config.json
        if not (Path(cfg.distill_from) / WEIGHTS_FILE).exists():
            raise ValueError(
                f"{Path(cfg.distill_from) / WEIGHTS_FILE}: missing: train the teacher first (distill_from)"
            )
        if teacher.vocab_size != cfg.model.vocab_size:
            raise ValueError(
                f"distill_from={cfg.distill_from}: the teacher's vocabulary ({teacher.vocab_size}) differs from "
                f"the model's ({cfg.model.vocab_size})"
            )


CONTINUED_DIR = "continued_from"


def continuation_start(run_dir: str | Path) -> Path:
    """The weights a continued run of `run_dir` starts from (TrainConfig.init_from): the finished run's model and
    config, copied to `run_dir/continued_from/` before the new run overwrites them. An interrupted continuation (no
    summary.json yet) keeps the copy it started from, so it resumes. ValueError when there is nothing to continue."""
    from model.io import CONFIG_FILE as MODEL_CONFIG_FILE
    from model.io import WEIGHTS_FILE

    run_dir = Path(run_dir)
    start = run_dir / CONTINUED_DIR
    if (run_dir / SUMMARY_FILE).exists() and (run_dir / WEIGHTS_FILE).exists():
        tmp = start.with_name(f".{CONTINUED_DIR}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in (WEIGHTS_FILE, MODEL_CONFIG_FILE):
            shutil.copy2(run_dir / name, tmp / name)
        shutil.rmtree(start, ignore_errors=True)
        os.replace(tmp, start)
    if not (start / WEIGHTS_FILE).exists():
        raise ValueError(f"{run_dir}: no finished run to continue from (train it once first)")
    return start


def prepare_run_dir(cfg: TrainConfig) -> bool:
    """Make the run folder ready; True when an interrupted run will be resumed."""
    run_dir = Path(cfg.run_dir)
    saved = run_dir / CONFIG_FILE
    resumable = (
        bool(complete_checkpoints(run_dir))
        and not (run_dir / SUMMARY_FILE).exists()
        and saved.exists()
        and json.loads(saved.read_text()) == cfg.to_dict()
    )
    if not resumable and run_dir.exists():
        for name in (CHECKPOINT_DIR, LOG_DIR, SUMMARY_FILE, "metrics.jsonl", "loss_curve.png"):
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(cfg.to_dict(), indent=2) + "\n")
    return resumable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg: TrainConfig) -> list[str]:
    """The command that trains the run whose config was saved by prepare_run_dir."""
    config_path = str(Path(cfg.run_dir) / CONFIG_FILE)
    if cfg.world_size == 1:
        return [sys.executable, "-m", "training.train", "--config", config_path]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.world_size}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "training.train", "--config", config_path,
    ]  # fmt: skip


def rank_log_tails(run_dir: str | Path, lines: int = 25) -> str:
    """The end of every rank's log, failing ranks (those with a traceback) first."""
    logs = sorted((Path(run_dir) / LOG_DIR).glob("rank*.log"))
    tails = []
    for log in logs:
        text = log.read_text(errors="replace").splitlines()
        failed = any("Traceback" in line for line in text)
        tails.append((not failed, f"--- {log} {'(failed)' if failed else ''}\n" + "\n".join(text[-lines:])))
    return "\n".join(t for _, t in sorted(tails, key=lambda t: t[0])) or f"no rank logs in {run_dir}/{LOG_DIR}"


def train_process(cfg: TrainConfig, env: dict[str, str] | None = None) -> None:
    """Train `cfg` in one real training process (python -m training.train, DeepSpeed; torchrun for several
    ranks), its output in <run_dir>/train.log; a RuntimeError with the log tails when it fails."""
    check_inputs(cfg)
    prepare_run_dir(cfg)
    log_path = Path(cfg.run_dir) / "train.log"
    with open(log_path, "w") as log:
        env = {**os.environ, **(env or {})}
        proc = subprocess.run(launch_command(cfg), stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{cfg.name} failed (exit {proc.returncode}):\n{tail}\n{rank_log_tails(cfg.run_dir)}")
