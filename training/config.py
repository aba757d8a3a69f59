"""Training run configuration: one dataclass, validated before anything is launched, and the DeepSpeed
config it implies.

The learning rate warms up linearly for `warmup_steps` (w), then follows `lr_schedule`:
- "cosine": from `lr` down to `min_lr` at `max_steps`: lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,
  p = (s - w) / (max_steps - w);
- "wsd" (warmup-stable-decay, as MiniCPM, OLMo 2 and Llama 3 train): `lr` until the last `decay_fraction` of the
  steps, then down to `min_lr` at `max_steps`, linearly (lr - (lr - min_lr) * p) or as 1 - sqrt
  (lr - (lr - min_lr) * sqrt(p), Hägele et al. 2024), p = the share of the decay done.

The data mixture can change by phase too (`DataConfig.mix_schedule`, read by training.data.PackedLoader), e.g. every
curated bucket at random during the stable phase and only the top quality tier during the decay ("quality anneal").
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from model import config as model_presets
from model.config import ModelConfig, dense_baseline, small_cpu

LR_SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
PRESETS = ("debug_tiny", "debug_tiny_draft", "small_cpu", "small_cpu_draft", "moe_1b")


CONFIG_FILE = "train_config.json"
"""The config a run folder carries, as launched (training.launch writes it)."""


@dataclass(kw_only=True, slots=True)
class MixPhase:
    """One phase of a data mixture schedule: which buckets the documents are drawn from, until when."""

    until: float
    """The phase ends at this fraction of the run's steps, in (0, 1]; phases are in order and the last ends at 1."""
    weights: dict[int, float] | None = None
    """Bucket -> weight (normalized over the phase): each document comes from a bucket drawn by these weights; a bucket
    drawn more often than it has documents starts another pass over them. None = see quality_tiers."""
    quality_tiers: list[int] | None = None
    """The buckets of these quality tiers (the manifest's `quality_tier`; negative counts from the top: -1 = the best
    tier), each document drawn in proportion to the documents they have left in this pass, so the phase reads a
    uniformly random order of their documents. None with weights None = every bucket of the manifest that way."""

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):  # JSON and TOML keys are strings
            try:
                self.weights = {int(b): w for b, w in self.weights.items()}
            except ValueError as e:
                raise ValueError(f"mix_schedule weights: bucket keys must be integers, not {list(self.weights)}") from e

    def check(self, where: str) -> None:
        if self.weights is not None and self.quality_tiers is not None:
            raise ValueError(f"{where}: give weights or quality_tiers, not both")
        if self.weights is not None:
            bad = [w for w in self.weights.values() if isinstance(w, bool) or not isinstance(w, int | float)
                   or not math.isfinite(w) or w < 0]  # fmt: skip
            if bad or sum(self.weights.values()) <= 0:
                raise ValueError(
                    f"{where}.weights={self.weights}: weights must be finite, non-negative and sum to a positive number"
                )
        if self.quality_tiers is not None and not self.quality_tiers:
            raise ValueError(f"{where}.quality_tiers is empty: name at least one tier (or leave it unset for all)")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Packing and order of the training stream."""

    seq_len: int = 256
    """Tokens per training sequence (each batch row holds seq_len + 1 tokens: inputs and shifted targets)."""
    batch_size: int = 8
    bucket_schedule: list[int] | None = None
    """Buckets in reading order, e.g. [0, 1, 2] or [2, 2, 0]; None = every bucket in manifest order."""
    mix_schedule: list[MixPhase] | None = None
    """A mixture of buckets per phase of the run instead of a reading order, e.g. a quality anneal:
    [{"until": 0.8}, {"until": 1.0, "quality_tiers": [-1]}] (MixPhase says what a phase may hold). None = the
    bucket_schedule's order."""
    mix_seed: int = 0
    """Seeds the mixture's draws (the same seed and shards give the same stream)."""
    validation_fraction: float = 0.02
    """Share of each bucket held out for validation (by a hash of the id)."""
    encode_batch_docs: int = 256
    """Documents tokenized together."""

    def __post_init__(self) -> None:
        if self.mix_schedule is not None:
            self.mix_schedule = [
                _build(MixPhase, p, f"data.mix_schedule[{n}]") if isinstance(p, dict) else p
                for n, p in enumerate(self.mix_schedule)
            ]

    def check(self) -> None:
        """The mixture's shape (its buckets are checked against the shards by training.data.check_mixture)."""
        if self.mix_schedule is None:
            return
        if self.bucket_schedule is not None:
            raise ValueError("data.mix_schedule and data.bucket_schedule exclude each other: give one")
        if not self.mix_schedule:
            raise ValueError("data.mix_schedule is empty: give at least one phase, or leave it unset")
        previous = 0.0
        for n, phase in enumerate(self.mix_schedule):
            where = f"data.mix_schedule[{n}]"
            if not previous < phase.until <= 1:
                raise ValueError(f"{where}.until={phase.until} must be in ({previous}, 1]: phases end in order")
            phase.check(where)
            previous = phase.until
        if previous != 1:
            raise ValueError(f"data.mix_schedule[{len(self.mix_schedule) - 1}].until={previous}: the last phase must "
                             "end at 1 (the end of the run)")  # fmt: skip

    def phase_at(self, fraction: float) -> int:
        """The mix_schedule phase that holds this fraction of the run."""
        assert self.mix_schedule is not None
        return next((n for n, p in enumerate(self.mix_schedule) if fraction < p.until), len(self.mix_schedule) - 1)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """A training run."""

    model: ModelConfig = field(default_factory=small_cpu)
    data: DataConfig = field(default_factory=DataConfig)
    """data.batch_size is the global batch: each of the world_size ranks trains batch_size / world_size rows."""
    shard_dir: str = "data/curriculum_shards"
    tokenizer_path: str = "data/tokenizer/tokenizer.json"
    run_dir: str = "runs/moe_model"
    """Checkpoints, metrics.jsonl, rank logs and the exported model."""
    name: str = "moe_model"
    max_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    lr_schedule: str = "cosine"
    """After the warmup: "cosine" down to min_lr, or "wsd" (constant, then a decay over the last decay_fraction)."""
    decay_fraction: float = 0.2
    """wsd: the share of max_steps the decay takes (MiniCPM: 0.1; OLMo 2 and Hägele et al. 2024: about 0.2)."""
    decay_shape: str = "1-sqrt"
    """wsd: linear or 1-sqrt (1-sqrt ends lower at the same length, Hägele et al. 2024)."""
    weight_decay: float = 0.1
    router_lr_scale: float = 0.1
    """The routers learn at lr x this: a fast-moving router outruns the balancing bias (measured on small_cpu)."""
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
    keep_checkpoints: int = 2
    """Older checkpoints are deleted."""
    log_every: int = 10
    """Steps between progress lines (every step goes to metrics.jsonl and W&B)."""
    val_tokens_per_bucket: int = 16_384
    """Held-out tokens evaluated per curriculum bucket."""
    threads_per_rank: int | None = None
    """torch threads per rank; None = the machine's cores divided among the ranks."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for the MFU estimate; None = measured with a matmul at start-up."""
    wandb_project: str = "frugal"
    init_from: str | None = None
    """A finished run folder (model.safetensors, config.json) whose weights start this run, e.g. the last run, to
    continue training on shards that gained drops; the optimizer and the schedule start afresh. None = random
    initial weights (seeded)."""
    distill_from: str | None = None
    """A trained run folder (model.safetensors, config.json) whose logits the model also learns from
    (knowledge distillation, e.g. a speculative draft from its target); None = plain next-token loss."""
    distill_weight: float = 0.5
    """loss = (1 - w) cross-entropy + w T^2 KL(teacher_T || student_T), T = distill_temperature."""
    distill_temperature: float = 1.0
    mtp_weight_schedule: str = "constant"
    """The MTP loss weight lambda over the run (model.mtp_depth > 0): "constant" keeps model.mtp_loss_weight;
    "stepped" drops it to mtp_weight_final after mtp_weight_step_fraction of max_steps, as DeepSeek-V3 did (0.3 for
    its first 10T tokens, 0.1 for the last 4.8T)."""
    mtp_weight_final: float = 0.1
    mtp_weight_step_fraction: float = 0.68
    """DeepSeek-V3 stepped at 10 / 14.8 of its tokens."""
    mtp_distill_weight: float = 0.0
    """Self-distillation of the MTP modules: each depth's loss is (1 - w) cross-entropy on the data + w KL(main head
    || depth) for the same token, the main head's logits detached (it teaches, it is not taught). The modules then
    read the main model's hidden states, embedding and head detached too: only they learn from their loss, and the
    main model trains as it would without them (a KL into the trunk kept one seed's main model on its early
    plateau, bench/mtp.py); lambda then does not apply (training.train.DETACHED_MTP_SCALE). 0 = DeepSeek-V3's plain
    cross-entropy, whose gradient reaches the main model.
    Speculation accepts what the main model would say, not what the data says: a distilled draft learns that, a
    plain MTP module does not."""

    def check(self) -> None:
        """Every mistake a launch would only find later, found now (ValueError naming the field)."""
        moe = self.model.n_routed_experts > 0
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, not {self.zero_stage}")
        if self.zero_stage == 3 and moe:
            raise ValueError("zero_stage=3 cannot train DeepSpeed MoE layers: use zero_stage 1 or 2")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")
        if self.world_size < 1 or self.data.batch_size % self.world_size:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} must divide evenly over world_size={self.world_size}"
            )
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide world_size={self.world_size}")
        if moe and self.model.n_routed_experts % self.ep_size:
            raise ValueError(
                f"n_routed_experts={self.model.n_routed_experts} is not divisible by ep_size={self.ep_size}"
            )
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not {self.lr_schedule!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, not {self.decay_shape!r}")
        if isinstance(self.decay_fraction, bool) or not 0 < self.decay_fraction < 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} must be in (0, 1)")
        if self.lr_schedule == "wsd" and self.decay_start < self.warmup_steps:
            raise ValueError(
                f"decay_fraction={self.decay_fraction} starts the decay at step {self.decay_start}, inside the warmup "
                f"(warmup_steps={self.warmup_steps}): lower one of them"
            )
        self.data.check()
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.model.mtp_depth >= self.data.seq_len:
            raise ValueError(
                f"model.mtp_depth={self.model.mtp_depth} leaves no position to train in sequences of data.seq_len="
                f"{self.data.seq_len}: depth k needs k + 1 tokens after a position"
            )
        if self.mtp_weight_schedule not in ("constant", "stepped"):
            raise ValueError(f"mtp_weight_schedule must be constant or stepped, not {self.mtp_weight_schedule!r}")
        if not 0 <= self.mtp_distill_weight <= 1:
            raise ValueError(f"mtp_distill_weight={self.mtp_distill_weight} must be in [0, 1]")
        if self.mtp_weight_final < 0 or not 0 < self.mtp_weight_step_fraction < 1:
            raise ValueError(
                f"mtp_weight_final={self.mtp_weight_final} must be >= 0 and mtp_weight_step_fraction="
                f"{self.mtp_weight_step_fraction} in (0, 1)"
            )
        if not 0 <= self.distill_weight <= 1 or self.distill_temperature <= 0:
            raise ValueError(
                f"distill_weight={self.distill_weight} must be in [0, 1] and distill_temperature="
                f"{self.distill_temperature} above 0"
            )

    @property
    def decay_start(self) -> int:
        """wsd: the first step of the decay (the stable phase is [warmup_steps, decay_start))."""
        return self.max_steps - max(1, round(self.decay_fraction * self.max_steps))

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based) under lr_schedule."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "wsd":
            if step < self.decay_start:
                return self.lr
            done = min(1.0, (step - self.decay_start + 1) / (self.max_steps - self.decay_start))
            shape = done if self.decay_shape == "linear" else math.sqrt(done)
            return self.lr - (self.lr - self.min_lr) * shape
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def mtp_weight_at(self, step: int) -> float:
        """lambda at `step` (see mtp_weight_schedule)."""
        stepped = self.mtp_weight_schedule == "stepped" and step >= self.mtp_weight_step_fraction * self.max_steps
        return self.mtp_weight_final if stepped else self.model.mtp_loss_weight

    def deepspeed_config(self) -> dict:
        """The DeepSpeed JSON config for this run (the optimizer and schedule are passed as objects)."""
        return {
            "train_batch_size": self.data.batch_size,
            "train_micro_batch_size_per_gpu": self.data.batch_size // self.world_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 10**9,  # progress is ours to report
            "wall_clock_breakdown": False,
        }

    def to_dict(self) -> dict:
        """As JSON holds it (bucket keys of mixture weights are strings), so a saved config compares equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, doc: dict) -> TrainConfig:
        """From a config file's contents. `model` may name a preset and override fields, e.g.
        {"preset": "small_cpu", "dense_baseline": true, "top_p": 0.7}; unknown keys are errors."""
        doc = dict(doc)
        model_doc = dict(doc.pop("model", {}) or {})
        preset = model_doc.pop("preset", None)
        dense = model_doc.pop("dense_baseline", False)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {PRESETS}, not {preset!r}")
        base = dataclasses.asdict(getattr(model_presets, preset)()) if preset else {}
        model = _build(ModelConfig, {**base, **model_doc}, "model")
        if dense:
            model = dense_baseline(model)
        data = _build(DataConfig, doc.pop("data", {}) or {}, "data")
        return _build(cls, {**doc, "model": model, "data": data}, "")

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """JSON or TOML."""
        return config_from_file(cls.from_dict, path)


def config_from_file(from_dict, path: str | Path):
    """from_dict(the JSON or TOML document at path); every error names the file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: config file not found")
    try:
        doc = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e
    try:
        return from_dict(doc)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def _build(kind, doc: dict, where: str):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(doc) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join((where + '.' if where else '') + u for u in unknown)}")
    return kind(**doc)
