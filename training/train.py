"""Train a Frugal model with DeepSpeed over the curriculum shards.

CLI: python -m training.train --config FILE (JSON or TOML, see training.config.TrainConfig)

Run by hand, it checks the inputs, prepares the run folder (resuming an interrupted run) and trains:
in this process for one rank, under torchrun for several. Each rank runs `train_rank`:

- every rank builds the same initial weights from the seed; MoE layers run on DeepSpeed's MoE layer
  (model.moe_deepspeed) and each rank keeps its share of the experts when ep_size > 1;
- the DeepSpeed engine does ZeRO-1/2, fp32 or bf16 and gradient clipping; the learning rate (warmup then
  cosine or warmup-stable-decay) is set on the optimizer each step, so a resumed run follows the same schedule;
- each rank trains its slice of the global batch (the same global batch whatever the number of ranks);
- after each step the router biases move toward balance by the expert loads summed over all ranks;
- checkpoints (engine, optimizer, data position, spend) every `checkpoint_every` steps, on SIGTERM and at
  the end; a restarted run continues exactly where the last checkpoint left off;
- metrics.jsonl and W&B get every step; a validation loss per curriculum bucket every `eval_every` steps;
- at the end, model.safetensors, config.json and tokenizer.json (the reference layout inference loads).

Under Dagster Pipes (the moe_model and dense_baseline_model assets), rank 0 streams its progress lines
to the Dagster event log and reports the final metrics as materialization metadata.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.io import atomic_file, save_model, write_text_atomic
from model.tokenizer import TOKENIZER_FILE, load_tokenizer
from model.transformer import Transformer
from training.config import TrainConfig
from training.data import PackedLoader, check_compatible, validation_rows
from training.launch import (
    CHECKPOINT_DIR,
    CHECKPOINT_DONE,
    LOG_DIR,
    SUMMARY_FILE,
    check_inputs,
    complete_checkpoints,
    free_port,
    launch_command,
    prepare_run_dir,
    rank_log_tails,
)
from training.metrics import MetricsSink, SpendMeter, flops_per_token, measure_peak_flops, plot_curves, read_metrics

log = logging.getLogger("frugal.train")
DETACHED_MTP_SCALE = 1e-3
"""Self-distilled (detached) MTP modules train on their loss times this. AdamW's steps do not depend on a
parameter's gradient scale, so the modules learn as they would at scale 1; but their gradients then barely count in
the global gradient norm that clipping divides every gradient by, so the main model steps as it would without them
(at scale 1 they shrank its steps, and one run stayed on its early plateau)."""
BALANCE_WINDOW = 50
"""Steps whose expert loads are summed for the windowed balance metric: one small batch holds a few
documents, and experts specialise by document, so a single step's max/mean overstates the imbalance."""


class Stop(Exception):
    """SIGTERM arrived: the run checkpointed and stops (exit status 143, like a terminated process)."""


def _setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / LOG_DIR / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _param_groups(model: torch.nn.Module, weight_decay: float, router_lr_scale: float) -> list[dict]:
    """Matrices decay; norms and routers do not, and routers learn at lr x router_lr_scale. Named groups,
    as DeepSpeed's MoE split needs; `lr_scale` is applied each step with the schedule."""
    decay, no_decay, router = [], [], []
    for name, p in model.named_parameters():
        if name.endswith(("router.weight", "gate.wg.weight")):
            router.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if router:
        groups.append({"name": "router", "params": router, "weight_decay": 0.0, "lr_scale": router_lr_scale})
    return groups


@dataclass(frozen=True, slots=True)
class MTPLoss:
    """One MTP depth on one batch."""

    ce: torch.Tensor
    """Cross-entropy against the data's token (DeepSeek-V3's MTP loss)."""
    accuracy: torch.Tensor
    """Top-1 accuracy against the data's token."""
    agreement: torch.Tensor
    """How often its argmax is the main head's argmax for the same token: the share of greedy proposals of this
    depth the target would accept, when every earlier proposal was right."""
    kl: torch.Tensor | None
    """KL(main head || this depth) for the same token, when self-distillation is on."""


def mtp_losses(
    mtp_logits: list[torch.Tensor], y_BT: torch.Tensor, main_BTV: torch.Tensor | None = None, distill: bool = False
) -> list[MTPLoss]:
    """Per MTP depth k (1-based): depth k's row i predicts y[i + k] (= x[i + k + 1]), the token the main head
    predicts at row i + k. main_BTV: the main head's logits (detached here), for the agreement and the KL."""
    out = []
    for k, logits_BTV in enumerate(mtp_logits, start=1):
        target = y_BT[:, k:].reshape(-1)
        flat = logits_BTV.float().reshape(-1, logits_BTV.shape[-1])
        guess = flat.argmax(-1)
        agreement, kl = torch.tensor(float("nan")), None
        if main_BTV is not None:
            teacher = main_BTV[:, k:].detach().float().reshape(-1, flat.shape[-1])
            agreement = (guess == teacher.argmax(-1)).float().mean()
            if distill:
                log_p, log_q = F.log_softmax(teacher, -1), F.log_softmax(flat, -1)
                kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        out.append(MTPLoss(F.cross_entropy(flat, target), (guess == target).float().mean(), agreement, kl))
    return out


def distillation_kl(student_BTV: torch.Tensor, x_BT: torch.Tensor, teacher: Transformer, T: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over tokens (Hinton et al. 2015):
    the student learns the teacher's whole next-token distribution, not just the data's token."""
    with torch.no_grad():
        teacher_BTV = teacher(x_BT).float()
    V = student_BTV.shape[-1]
    log_p = F.log_softmax(teacher_BTV.reshape(-1, V) / T, -1)
    log_q = F.log_softmax(student_BTV.float().reshape(-1, V) / T, -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * T**2


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int, world: int):
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.cfg, self.rank, self.world = cfg, rank, world
        self.run_dir = Path(cfg.run_dir)
        self.moe = cfg.model.n_routed_experts > 0
        torch.manual_seed(cfg.seed)
        reference = Transformer(cfg.model)  # identical initial weights on every rank
        if cfg.init_from is not None:  # continued training: the weights of a finished run (a resume overrides them)
            from model.io import load_model

            reference.load_state_dict(load_model(Path(cfg.init_from)).state_dict())
        if self.moe:
            from model.moe_deepspeed import deepspeed_transformer, load_reference_state

            model = deepspeed_transformer(cfg.model, cfg.ep_size)
            load_reference_state(model, reference.state_dict(), ep_rank=rank % cfg.ep_size)
        else:
            model = reference
        groups = _param_groups(model, cfg.weight_decay, cfg.router_lr_scale)
        if self.moe:
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr_at(0), betas=(0.9, 0.95), eps=1e-8)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=cfg.deepspeed_config()
        )
        self.teacher = None
        if cfg.distill_from is not None:  # the plain-torch teacher, frozen, in every rank
            from model.io import load_model

            self.teacher = load_model(Path(cfg.distill_from)).requires_grad_(False)
        self.ep_group = None
        if self.moe and cfg.ep_size > 1:
            from deepspeed.utils import groups as ds_groups

            self.ep_group = ds_groups._get_expert_parallel_group(f"ep_size_{cfg.ep_size}")
            if dist.get_rank(self.ep_group) != rank % cfg.ep_size:
                raise RuntimeError("DeepSpeed laid out the expert-parallel groups differently than expected")

        self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        check_compatible(self.tokenizer, cfg.model)
        self.loader = PackedLoader(cfg.shard_dir, self.tokenizer, cfg.data, total_steps=cfg.max_steps)
        self.val_rows = validation_rows(self.loader, cfg)
        self.micro = cfg.data.batch_size // world
        self.step, self.tokens = 0, 0
        self.meter = SpendMeter(world, cfg.price_per_device_hour)
        self.stop_requested = False
        self.load_window: collections.deque = collections.deque(maxlen=BALANCE_WINDOW)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = cfg.peak_flops or measure_peak_flops()
        self._resume()
        self.sink = MetricsSink(
            self.run_dir, config=cfg.to_dict(), project=cfg.wandb_project, group=cfg.name,
            name=f"{cfg.name}-from-step{self.step}", enabled=rank == 0,
        )  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------------------

    def _resume(self) -> None:
        ckpt = self.run_dir / CHECKPOINT_DIR
        done = complete_checkpoints(self.run_dir)
        if not done:
            return
        path, client = self.engine.load_checkpoint(str(ckpt), tag=done[-1].name)
        if path is None:
            raise RuntimeError(f"{done[-1]}: the checkpoint could not be loaded")
        self.step, self.tokens = client["step"], client["tokens"]
        self.loader.load_state_dict(client["loader"])
        self.meter.device_seconds = client["device_seconds"]
        self.load_window.extend(torch.tensor(w) for w in client["load_window"])
        if self.rank == 0:  # metrics logged after that checkpoint are about to be recomputed
            kept = [r for r in read_metrics(self.run_dir) if r["step"] <= self.step]
            write_text_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        log.info(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens)")

    def save_checkpoint(self) -> None:
        """Every rank writes its part of the tag, then rank 0 marks the tag complete and prunes old complete tags
        and incomplete ones left by a killed save (launch.complete_checkpoints)."""
        self.meter.tick()
        ckpt = self.run_dir / CHECKPOINT_DIR
        client = {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "device_seconds": self.meter.device_seconds,
            "load_window": [w.tolist() for w in self.load_window],
        }
        tag = f"step_{self.step:07d}"
        self.engine.save_checkpoint(str(ckpt), tag=tag, client_state=client)
        dist.barrier()
        if self.rank == 0:
            write_text_atomic(ckpt / tag / CHECKPOINT_DONE, f"{self.step}\n")
            done = complete_checkpoints(self.run_dir)
            keep = {t.name for t in done[-self.cfg.keep_checkpoints :]}
            for old in (p for p in ckpt.glob("step_*") if p.is_dir() and p.name not in keep):
                shutil.rmtree(old)
        dist.barrier()  # no rank goes on (or resumes) before the marker is written
        log.info(f"checkpoint step {self.step} -> {ckpt}")

    # -- steps -------------------------------------------------------------------------------------------

    def _moe_layers(self) -> list:
        """The main model's MoE layers, then the MTP modules': every one balances by its own loads."""
        module = self.engine.module
        return module.moe_layers() + module.mtp_moe_layers() if self.moe else []

    def train_step(self, batch_BT: torch.Tensor) -> dict:
        cfg = self.cfg
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        local = batch_BT[self.rank * self.micro : (self.rank + 1) * self.micro]
        x, y = local[:, :-1], local[:, 1:]
        start = time.perf_counter()
        depth = cfg.model.mtp_depth
        detached = cfg.mtp_distill_weight > 0  # self-distilled modules learn beside the main model, not into it
        logits, mtp_logits = self.engine(x, with_mtp=True, mtp_detached=detached) if depth else (self.engine(x), [])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.model.vocab_size), y.reshape(-1))
        aux = self.engine.module.aux_loss() if self.moe else torch.zeros(())
        objective, kl = loss, None
        if self.teacher is not None:
            kl = distillation_kl(logits, x, self.teacher, cfg.distill_temperature)
            objective = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kl
        mtp = mtp_losses(mtp_logits, y, logits, distill=cfg.mtp_distill_weight > 0)
        mtp_weight = cfg.mtp_weight_at(self.step)
        if mtp:  # DeepSeek-V3: L = L_main + lambda * mean over depths of L_MTP^k
            w = cfg.mtp_distill_weight
            per_depth = [m.ce if not w else (1 - w) * m.ce + w * m.kl for m in mtp]
            scale = DETACHED_MTP_SCALE if detached else mtp_weight
            objective = objective + scale * sum(per_depth) / len(per_depth)
        self.engine.backward(objective + aux.to(loss.dtype))
        self.engine.step()
        self.step += 1
        self.tokens += batch_BT.shape[0] * cfg.data.seq_len

        layers = self._moe_layers()
        E = cfg.model.n_routed_experts
        # one all-reduce: loss, stop flag, distillation KL, MTP loss and accuracy per depth, and per MoE layer its
        # expert loads, routed and dropped routes
        parts = [loss.detach().float().view(1), torch.tensor([float(self.stop_requested)])]
        if kl is not None:
            parts.append(kl.detach().float().view(1))
        parts += [torch.stack([m.ce, m.accuracy, m.agreement]).detach().float() for m in mtp]
        for layer in layers:  # DeepSpeedMoE layers: their gate counts routes
            parts += [
                layer.last_routing.load_E(E),
                torch.tensor([layer.gate.routed, layer.gate.dropped_routes], dtype=torch.float32),
            ]
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        self.stop_requested = flat[1].item() > 0
        record = {"step": self.step, "loss": flat[0].item() / self.world, "lr": lr, "tokens": self.tokens}
        # the mixture this step read: each bucket's share of the documents begun since the last step
        record |= {f"mix/bucket{b}": share for b, share in self.loader.take_mixture().items()}
        if cfg.data.mix_schedule is not None:
            record["mix_phase"] = self.loader.phase(self.step - 1)
        at = 2
        if kl is not None:
            record["distill_kl"] = flat[at].item() / self.world
            at += 1
        for k in range(1, len(mtp) + 1):
            record[f"mtp_loss/depth{k}"] = flat[at].item() / self.world
            record[f"mtp_accuracy/depth{k}"] = flat[at + 1].item() / self.world
            record[f"mtp_agreement/depth{k}"] = flat[at + 2].item() / self.world
            at += 3
        if mtp:
            record["mtp_weight"] = mtp_weight
        n_tokens = batch_BT.shape[0] * cfg.data.seq_len
        if layers:
            per_layer = flat[at:].view(len(layers), E + 2)
            load_LE, routed_L, dropped_L = per_layer[:, :E], per_layer[:, E], per_layer[:, E + 1]
            for layer, load_E in zip(layers, load_LE):
                layer.update_bias(load_E)
            ratio_L = load_LE.max(-1).values / load_LE.mean(-1).clamp_min(1e-9)
            for i, layer in enumerate(layers):
                record[f"expert_load_max_over_mean/layer{i}"] = ratio_L[i].item()
                record[f"router_bias_norm/layer{i}"] = layer.bias.norm().item()
            self.load_window.append(load_LE.clone())
            window_LE = torch.stack(list(self.load_window)).sum(0)
            record["expert_load_max_over_mean_window"] = (window_LE.max(-1).values / window_LE.mean(-1)).max().item()
            record["expert_load_max_over_mean"] = ratio_L.max().item()
            record["active_experts_per_token"] = routed_L.sum().item() / (n_tokens * len(layers))
            record["dropped_route_fraction"] = dropped_L.sum().item() / max(1.0, routed_L.sum().item())
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        seconds = time.perf_counter() - start
        self.meter.tick()
        record["tokens_per_s"] = n_tokens / seconds
        record["mfu"] = self.flops_per_token * record["tokens_per_s"] / (self.peak_flops * self.world)
        record["device_hours"] = self.meter.device_hours
        record["spend_usd"] = self.meter.spend
        record["usd_per_1m_tokens"] = self.meter.per_million(self.tokens)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean held-out loss per bucket (every rank runs the same rows: expert-parallel forwards stay in step)."""
        self.engine.eval()
        out, total, count = {}, 0.0, 0
        layers = self._moe_layers()
        loads = [torch.zeros(self.cfg.model.n_routed_experts) for _ in layers]
        depth = self.cfg.model.mtp_depth
        mtp_sums = torch.zeros(depth, 3)  # per depth: summed loss, accuracy and agreement, weighted by rows
        for bucket, rows in self.val_rows.items():
            losses = []
            for batch in rows.split(self.micro):
                x, y = batch[:, :-1], batch[:, 1:]
                logits, mtp_logits = self.engine(x, with_mtp=True) if depth else (self.engine(x), [])
                for load, layer in zip(loads, layers):
                    load += layer.last_routing.load_E(self.cfg.model.n_routed_experts)
                losses.append(
                    F.cross_entropy(logits.float().reshape(-1, self.cfg.model.vocab_size), y.reshape(-1)) * y.numel()
                )
                for k, m in enumerate(mtp_losses(mtp_logits, y, logits)):
                    mtp_sums[k] += torch.stack([m.ce, m.accuracy, m.agreement]).float() * len(batch)
            n = rows[:, 1:].numel()
            out[f"val_loss/bucket{bucket}"] = (sum(losses) / n).item()
            total, count = total + sum(losses).item(), count + n
        out["val_loss"] = total / count
        n_rows = sum(len(rows) for rows in self.val_rows.values())
        for k in range(depth):
            out[f"val_mtp_loss/depth{k + 1}"] = (mtp_sums[k, 0] / n_rows).item()
            out[f"val_mtp_accuracy/depth{k + 1}"] = (mtp_sums[k, 1] / n_rows).item()
            out[f"val_mtp_agreement/depth{k + 1}"] = (mtp_sums[k, 2] / n_rows).item()
        if layers:  # balance over every held-out token: many documents, unlike one training batch
            ratios = [(load.max() / load.mean().clamp_min(1e-9)).item() for load in loads]
            out.update({f"val_expert_load_max_over_mean/layer{i}": r for i, r in enumerate(ratios)})
            out["val_expert_load_max_over_mean"] = max(ratios)
        self.engine.train()
        return out

    def _batches(self):
        while True:
            yield from self.loader

    def _progress(self, record: dict) -> str:
        cfg = self.cfg
        parts = [f"step {record['step']}/{cfg.max_steps}", f"loss {record['loss']:.3f}"]
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.3f}")
        parts += [f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s", f"mfu {record['mfu']:.1%}"]
        if "mix_phase" in record:
            parts.append(f"mix phase {record['mix_phase']}")
        if "expert_load_max_over_mean" in record:
            parts.append(f"load max/mean {record['expert_load_max_over_mean']:.2f}")
            parts.append(f"experts/token {record['active_experts_per_token']:.2f}")
        if "mtp_accuracy/depth1" in record:
            parts.append(f"mtp1 acc {record['mtp_accuracy/depth1']:.2f}")
        parts.append(f"${record['spend_usd']:.4f}")
        return " | ".join(parts)

    def run(self, pipes=None) -> dict:
        cfg = self.cfg
        batches = self._batches()
        record: dict = {}
        while self.step < cfg.max_steps:
            record = self.train_step(next(batches))
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                record.update(self.evaluate())
            self.sink.log(record)
            due = self.step % cfg.log_every == 0 or self.step == cfg.max_steps or "val_loss" in record
            if self.rank == 0 and due:
                line = self._progress(record)
                log.info(line)
                if pipes is not None:
                    pipes.log.info(line)
            if self.stop_requested:
                self.save_checkpoint()
                raise Stop(f"stopped by SIGTERM at step {self.step}; rerun to resume")
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        self.save_checkpoint()
        return self.finish(record)

    def finish(self, record: dict) -> dict:
        """Export the model in the reference layout and write summary.json (which marks the run done)."""
        from model.moe_deepspeed import reference_state

        module = self.engine.module
        state = reference_state(module, self.ep_group) if self.moe else module.state_dict()
        records = read_metrics(self.run_dir) if self.rank == 0 else []  # rank 0 writes metrics.jsonl
        reported = ("loss", "val_", "expert_load", "active_", "dropped", "mtp_")
        summary = {
            "step": self.step,
            "tokens": self.tokens,
            **{k: v for k, v in record.items() if k.startswith(reported)},
            "tokens_per_s": _mean_recent(records, "tokens_per_s"),
            "mfu": _mean_recent(records, "mfu"),
            "device_hours": self.meter.device_hours,
            "spend_usd": self.meter.spend,
            "usd_per_1m_tokens": self.meter.per_million(self.tokens),
            "total_params": self.cfg.model.total_params(),
            "active_params": self.cfg.model.active_params(),
        }
        if self.rank == 0:
            save_model(
                {k: v.float() for k, v in state.items()}, self.cfg.model, self.run_dir,
                extra={"trained": {"name": self.cfg.name, "step": self.step, "tokens": self.tokens}},
            )  # fmt: skip
            with atomic_file(self.run_dir / TOKENIZER_FILE) as tmp:
                shutil.copyfile(self.cfg.tokenizer_path, tmp)
            png = plot_curves(records, self.run_dir / "loss_curve.png", self.cfg.name)
            self.sink.log_image("loss_curve", png)
            summary["wandb_run"] = self.sink.finish(summary)
            write_text_atomic(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")  # marks the run done
            log.info(f"done: {self.run_dir} ({json.dumps({k: summary[k] for k in ('step', 'tokens', 'val_loss')})})")
        dist.barrier()
        return summary


def _mean_recent(records: list[dict], key: str, last: int = 50) -> float | None:
    values = [r[key] for r in records if key in r][-last:]
    return sum(values) / len(values) if values else None


def train_rank(cfg: TrainConfig) -> dict:
    """One rank of a run (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the launcher)."""
    import deepspeed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != cfg.world_size:
        raise ValueError(f"launched with {world} ranks but the config says world_size={cfg.world_size}")
    run_dir = Path(cfg.run_dir)
    _setup_logging(run_dir, rank)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cfg.threads_per_rank or max(1, cores // world))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo", verbose=False)
    pipes_cm = None
    try:
        trainer = Trainer(cfg, rank, world)
        signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "stop_requested", True))
        pipes = None
        if rank == 0:
            from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

            if DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ:  # launched by a Dagster asset
                pipes_cm = open_dagster_pipes()
                pipes = pipes_cm.__enter__()
        summary = trainer.run(pipes)
        if pipes is not None:
            pipes.report_asset_materialization(metadata={k: v for k, v in summary.items() if v is not None})
        return summary
    except Stop as e:
        log.warning(str(e))
        raise
    except Exception:
        log.exception("training failed")
        raise
    finally:
        if pipes_cm is not None:
            pipes_cm.__exit__(*sys.exc_info())
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config (JSON or TOML)")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig.from_file(args.config)
        if "RANK" not in os.environ:  # started by hand: check, prepare, then launch
            check_inputs(cfg)
            resumed = prepare_run_dir(cfg)
            print(f"{'resuming' if resumed else 'starting'} {cfg.name} in {cfg.run_dir} ({cfg.world_size} rank(s))")
            if cfg.world_size > 1:
                proc = subprocess.Popen(launch_command(cfg))
                signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))  # ranks checkpoint
                rc = proc.wait()
                if rc:
                    print(f"training failed (exit {rc}); rank logs:\n{rank_log_tails(cfg.run_dir)}", file=sys.stderr)
                return rc
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ["MASTER_PORT"] = str(free_port())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train_rank(cfg)
    except Stop:
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
