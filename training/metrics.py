"""What a training run reports: throughput, an MFU estimate, spend, and the metrics.jsonl + W&B sinks.

Spend: device-hours = wall-clock seconds x ranks / 3600, times a configured price per device-hour.
MFU: model FLOPs per token (6 x the matmul parameters a token uses, plus 12 x layers x d_model x seq_len
for attention, as in the PaLM paper) x tokens/s, over the peak FLOP/s of all ranks. The peak is
configured, or measured at start-up with a large fp32 matmul on one rank (so on a CPU MFU is relative to
what this machine's BLAS reaches, not to a datasheet).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from model.config import ModelConfig
from model.io import atomic_file


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, the MTP modules included (each runs a block, the 2D -> D
    projection and the shared output head once more per token)."""
    matmul_params = config.active_params() - config.vocab_size * config.d_model * (0 if config.tie_embeddings else 1)
    mtp_block = config._attn_params() + config.active_ffn_params(config.n_layers)
    mtp = config.mtp_depth * (mtp_block + 2 * config.d_model**2 + config.vocab_size * config.d_model)
    layers = config.n_layers + config.mtp_depth
    return 6.0 * (matmul_params + mtp) + 12.0 * layers * config.d_model * seq_len


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of repeated size x size matmuls on this process's threads (the practical peak)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * size**3 * n / elapsed


class SpendMeter:
    """Device-hours and $ over a run, carried across resumes."""

    def __init__(self, world_size: int, price_per_device_hour: float, device_seconds: float = 0.0):
        self.world_size = world_size
        self.price = price_per_device_hour
        self.device_seconds = device_seconds
        self._last = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        self.device_seconds += (now - self._last) * self.world_size
        self._last = now

    @property
    def device_hours(self) -> float:
        return self.device_seconds / 3600.0

    @property
    def spend(self) -> float:
        return self.device_hours * self.price

    def per_million(self, tokens: int) -> float:
        return self.spend / tokens * 1e6 if tokens else float("nan")


class MetricsSink:
    """Appends one JSON line per record to metrics.jsonl and logs the same values to W&B (rank 0 only).

    W&B is offline unless WANDB_API_KEY is set (then online unless WANDB_MODE says otherwise). The
    attempts of one training run share a group (WANDB_RUN_GROUP, else the run's name), so a resumed
    run shows up beside the first attempt.
    """

    def __init__(self, run_dir: Path, *, config: dict, project: str, group: str, name: str, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        import wandb

        os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.wandb_run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", project), group=os.environ.get("WANDB_RUN_GROUP", group),
            name=name, config=config, job_type="train", dir=str(wandb_dir), reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_image(self, key: str, png: Path) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(png))})

    def finish(self, summary: dict) -> str | None:
        """Closes the W&B run; returns its local folder."""
        if self.wandb_run is None:
            return None
        self.wandb_run.summary.update(summary)
        run_dir = str(Path(self.wandb_run.dir).parent)
        self.wandb_run.finish()
        self.wandb_run = None
        return run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(records: list[dict], png: Path, title: str) -> Path:
    """Training and validation loss against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png
