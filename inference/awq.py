"""Activation-aware weight quantization (AWQ, Lin et al. 2023): per-input-channel scales found on
calibration tokens, so that the inputs that carry large activations lose less to rounding.

For a matrix W (N x K) and any s > 0 per input channel, x W^T = (x / s) (W diag(s))^T exactly. Quantizing
W diag(s) instead of W multiplies column k's weights by s_k before rounding; in a group-wise (or per-row)
scheme the rounding step is set by the group's range, so column k's rounding error relative to its weight
shrinks by about s_k while the other columns' grows a little. The output error of column k is scaled by
|x_k|, so it pays to scale up the columns whose inputs are large: s = mean|x|^alpha, with alpha in [0, 1]
searched per matrix to minimise the output error on calibration rows,

    err(alpha) = mean || x W^T - (x / s) Q(W diag(s))^T ||^2,

normalised by sqrt(max(s) min(s)) so that s sits around 1 (the quantized grid only sees ratios, this keeps
the numbers tame). alpha = 0 is s = 1, plain quantization, so the chosen scales are never worse than plain
quantization on the calibration rows. Matrices are searched independently (AWQ's scale search; no
weight-clipping search, no folding of s into the previous layer: the quantized layer multiplies its input
by input_scale = 1 / s itself, see inference.runtime.quantize).

Conventions: `input_scales[name]` is `input_scale_K` = 1 / s, one positive value per input channel, for each
name of `inference.runtime.quantize.matrices(model)`; pass the dict to `quantize_weights` / `quantize_linears`.
A matrix that saw no calibration row (a routed expert no token reached) has no entry and is quantized plainly.

Shape legend: M kept calibration rows, N outputs, K inputs, B batch, T positions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inference.runtime.quantize import (
    Int4Weight,
    Int8Weight,
    QuantConfig,
    effective_weight,
    group_for,
    matrices,
    quantize_int4,
    quantize_int8,
)

log = logging.getLogger(__name__)

MIN_RELATIVE_ACTIVATION = 1e-4
"""mean|x| is clamped to this fraction of its largest channel before the power (AWQ clamps at 1e-4 too),
so a channel no calibration token used keeps a bounded scale."""


@dataclass(slots=True)
class Activations:
    """What one matrix saw as input during calibration."""

    rows_MK: torch.Tensor
    """At most max_rows input rows (fp32): a uniform sample without replacement of all rows, deterministic
    (each row gets a seeded random key; the rows with the largest keys are kept)."""
    keys_M: torch.Tensor
    """The kept rows' sampling keys."""
    mean_abs_K: torch.Tensor
    """Exact mean |x| per input channel over every row seen, not only the kept ones."""
    n_rows: int


class _Recorder:
    """Running sample and mean |x| for one input stream, with memory bounded by max_rows."""

    def __init__(self, max_rows: int, seed: int):
        self.max_rows = max_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.rows_MK: torch.Tensor | None = None
        self.keys_M = torch.empty(0)
        self.abs_sum_K: torch.Tensor | None = None
        self.n_rows = 0

    def add(self, x: torch.Tensor) -> None:
        x_MK = x.detach().reshape(-1, x.shape[-1]).float()
        keys = torch.rand(x_MK.shape[0], generator=self.generator)
        abs_sum = x_MK.abs().sum(0, dtype=torch.float64)
        if self.rows_MK is None:
            self.rows_MK, self.abs_sum_K = x_MK[:0].clone(), torch.zeros_like(abs_sum)
        self.abs_sum_K += abs_sum
        self.n_rows += x_MK.shape[0]
        rows, self.keys_M = torch.cat([self.rows_MK, x_MK]), torch.cat([self.keys_M, keys])
        if rows.shape[0] > self.max_rows:
            keep = self.keys_M.topk(self.max_rows).indices.sort().values
            rows, self.keys_M = rows[keep], self.keys_M[keep]
        self.rows_MK = rows  # torch.cat copied: no reference to the model's activations is kept

    def result(self) -> Activations | None:
        if self.rows_MK is None or self.n_rows == 0:
            return None
        return Activations(self.rows_MK, self.keys_M, (self.abs_sum_K / self.n_rows).float(), self.n_rows)


@torch.no_grad()
def collect_activations(
    model: nn.Module, batches: Iterable[torch.Tensor], max_rows: int = 512, seed: int = 0
) -> dict[str, Activations]:
    """Run the model (eval mode, no grad) over calibration token batches (LongTensor (B, T) each) and
    return, for each name of `matrices(model)` that received at least one row, its input rows.

    A bias-free nn.Linear is observed by a forward pre-hook. A routed expert sees only the tokens routed to
    it: `MoE._expert(e, h)` is wrapped on the instance, h is the input of w1 and w3 (one shared record) and
    silu(h W1^T) * (h W3^T), recomputed from the same weights, the input of w2; the wrapper returns what the
    original method returns, so the model's outputs are untouched. Hooks and wrappers are removed and the
    train/eval mode restored afterwards, also on error.
    """
    from model.transformer import MoE

    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    names = list(matrices(model))
    recorders: dict[str, _Recorder] = {}

    def recorder(name: str) -> _Recorder:
        if name not in recorders:
            recorders[name] = _Recorder(max_rows, seed)
        return recorders[name]

    handles: list[torch.utils.hooks.RemovableHandle] = []
    wrapped: list[MoE] = []
    was_training = model.training
    try:
        for path, module in model.named_modules():
            if isinstance(module, nn.Linear) and path in names:
                rec = recorder(path)
                handles.append(module.register_forward_pre_hook(lambda _m, args, rec=rec: rec.add(args[0])))
            elif isinstance(module, MoE) and f"{path}.experts.0.w1" in names:
                assert "_expert" not in vars(module), f"{path}._expert is already wrapped"
                module._expert = _recording_expert(module, path, recorder)
                wrapped.append(module)
        model.eval()
        for tokens_BT in batches:
            model(tokens_BT)
    finally:
        for handle in handles:
            handle.remove()
        for module in wrapped:
            del module._expert  # the class's method is visible again
        model.train(was_training)
    out: dict[str, Activations] = {}
    for name in names:
        base, _, weight = name.rpartition(".")
        key = f"{base}.w1" if ".experts." in name and weight == "w3" else name  # w3 shares w1's record
        acts = recorders[key].result() if key in recorders else None
        if acts is not None:
            out[name] = acts
    return out


def _recording_expert(moe: nn.Module, path: str, recorder: Callable[[str], _Recorder]):
    original = moe._expert  # the bound class method

    def expert(e: int, h_ND: torch.Tensor) -> torch.Tensor:
        recorder(f"{path}.experts.{e}.w1").add(h_ND)
        hidden_NF = F.silu(F.linear(h_ND, moe.w1_EFD[e])) * F.linear(h_ND, moe.w3_EFD[e])
        recorder(f"{path}.experts.{e}.w2").add(hidden_NF)
        return original(e, h_ND)

    return expert


@dataclass(frozen=True, slots=True)
class MatrixCalibration:
    """The search's outcome for one matrix: output MSE on its kept calibration rows."""

    alpha: float
    """The chosen exponent: s = mean|x|^alpha (0 = plain quantization)."""
    plain_mse: float
    awq_mse: float
    rows: int
    """Rows the matrix saw in calibration (the MSEs use at most max_rows of them)."""

    @property
    def reduction(self) -> float:
        """1 - awq_mse / plain_mse: the fraction of the plain quantization's output error removed."""
        return 1.0 - self.awq_mse / self.plain_mse if self.plain_mse > 0 else 0.0


@dataclass(slots=True)
class AWQCalibration:
    input_scales: dict[str, torch.Tensor]
    """input_scale_K = 1 / s by matrix name, for quantize_weights / quantize_linears."""
    matrices: dict[str, MatrixCalibration]
    uncalibrated: list[str]
    """Matrices that saw no calibration row (quantized plainly: no entry in input_scales)."""

    def summary(self) -> dict[str, float | int]:
        """Aggregate numbers for an asset's metadata."""
        reports = list(self.matrices.values())
        plain = sum(r.plain_mse for r in reports)
        awq = sum(r.awq_mse for r in reports)
        n = max(len(reports), 1)
        return {
            "matrices_calibrated": len(reports),
            "matrices_uncalibrated": len(self.uncalibrated),
            "mean_alpha": sum(r.alpha for r in reports) / n,
            "plain_alpha_chosen": sum(r.alpha == 0 for r in reports),
            "mean_error_reduction": sum(r.reduction for r in reports) / n,
            "total_error_reduction": 1.0 - awq / plain if plain > 0 else 0.0,
        }


def _quantize(w_NK: torch.Tensor, cfg: QuantConfig, input_scale_K: torch.Tensor) -> Int8Weight | Int4Weight:
    if cfg.scheme == "int8":
        return quantize_int8(w_NK, input_scale_K)
    return quantize_int4(w_NK, group_for(w_NK.shape[1], cfg.group_size), cfg.symmetric, input_scale_K)


def output_mse(w_NK: torch.Tensor, rows_MK: torch.Tensor, weight: Int8Weight | Int4Weight) -> float:
    """mean || x W^T - x W_q^T ||^2 over rows and outputs, W_q the quantized layer's effective matrix."""
    diff_NK = w_NK.detach().float() - effective_weight(weight)
    return (rows_MK @ diff_NK.T).pow(2).mean().item()


def search_input_scale(
    w_NK: torch.Tensor, acts: Activations, cfg: QuantConfig, grid: int = 20
) -> tuple[torch.Tensor, MatrixCalibration]:
    """AWQ's grid search over alpha in linspace(0, 1, grid) for one matrix; returns (input_scale_K, report).
    Ties go to the smaller alpha, so a matrix that scaling does not help keeps s = 1."""
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    w = w_NK.detach().float()
    mean_abs_K = acts.mean_abs_K.float()
    top = mean_abs_K.max()
    relative_K = (mean_abs_K / top if top > 0 else torch.ones_like(mean_abs_K)).clamp_min(MIN_RELATIVE_ACTIVATION)
    best: tuple[float, float, torch.Tensor] | None = None
    plain = 0.0
    for alpha in torch.linspace(0, 1, grid).tolist():
        s_K = relative_K.pow(alpha)
        s_K = s_K / (s_K.max() * s_K.min()).sqrt()
        input_scale_K = 1.0 / s_K
        err = output_mse(w, acts.rows_MK, _quantize(w, cfg, input_scale_K))
        if alpha == 0:
            plain = err
        if best is None or err < best[1]:
            best = (alpha, err, input_scale_K)
    assert best is not None
    alpha, err, input_scale_K = best
    return input_scale_K, MatrixCalibration(alpha, plain, err, acts.n_rows)


def awq_calibrate(
    model: nn.Module, batches: Iterable[torch.Tensor], cfg: QuantConfig, grid: int = 20, max_rows: int = 512
) -> AWQCalibration:
    """Collect the fp32 model's inputs per matrix on `batches` and search each matrix's scales for `cfg`."""
    cfg.check()
    weights = matrices(model)
    acts = collect_activations(model, batches, max_rows)
    input_scales: dict[str, torch.Tensor] = {}
    reports: dict[str, MatrixCalibration] = {}
    for name, w in weights.items():
        if name in acts:
            input_scales[name], reports[name] = search_input_scale(w, acts[name], cfg, grid)
    result = AWQCalibration(input_scales, reports, [n for n in weights if n not in acts])
    log.info("AWQ %s: %s", cfg.scheme, result.summary())
    return result


def awq_input_scales(
    model: nn.Module, batches: Iterable[torch.Tensor], cfg: QuantConfig, grid: int = 20, max_rows: int = 512
) -> dict[str, torch.Tensor]:
    """input_scale_K = 1 / s per matrix name (see the module docstring); matrices that saw no calibration
    row are left out. `awq_calibrate` also returns the per-matrix alpha and error reduction."""
    return awq_calibrate(model, batches, cfg, grid, max_rows).input_scales
