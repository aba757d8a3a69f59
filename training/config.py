"""Training run configuration: one dataclass, validated before anything is launched, and the DeepSpeed
config it implies.

The learning rate warms up linearly for `warmup_steps`, then follows a cosine from `lr` down to
`min_lr` at `max_steps`: lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * (s - w) / (max_steps - w))) / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.config import ModelConfig, small_cpu
from training.data import DataConfig


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """A training run."""

    model: ModelConfig = field(default_factory=small_cpu)
    data: DataConfig = field(default_factory=DataConfig)
    max_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"
    """fp32 or bf16."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0, 1 or 2 (ZeRO-3 does not support DeepSpeed's MoE layer)."""
    world_size: int = 1
    """Ranks (processes) the launcher starts."""
    ep_size: int = 1
    """Expert-parallel group size: routed experts are split over this many ranks."""
    checkpoint_every: int = 100
    """Steps between checkpoints (one is also written on SIGTERM and at the end)."""
    eval_every: int = 50
    seed: int = 0
    price_per_device_hour: float = 0.05
    """$ per device-hour, for the spend meter (a CPU core-hour by default)."""

    def check(self) -> None:
        """Every mistake a launch would only find later, found now (ValueError naming the field)."""
        moe = self.model.n_routed_experts > 0
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, not {self.zero_stage}")
        if self.zero_stage == 3 and moe:
            raise ValueError("zero_stage=3 cannot train DeepSpeed MoE layers: use zero_stage 1 or 2")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide world_size={self.world_size}")
        if moe and self.model.n_routed_experts % self.ep_size:
            raise ValueError(
                f"n_routed_experts={self.model.n_routed_experts} is not divisible by ep_size={self.ep_size}"
            )
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps})")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def deepspeed_config(self) -> dict:
        """The DeepSpeed JSON config for this run (the optimizer and schedule are passed as objects)."""
        return {
            "train_micro_batch_size_per_gpu": self.data.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 10**9,  # progress is ours to report
            "wall_clock_breakdown": False,
        }
