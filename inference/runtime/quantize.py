"""Weight-only quantization: INT8 per output channel, INT4 group-wise (32, 64 or 128 inputs per group,
symmetric or asymmetric), with CPU kernels for the matmuls.

INT8: w ~ q * s, q in [-127, 127], one s per output row (torch's `aten._weight_int8pack_mm`).
INT4 (Frugal's W4A8 kernel, kernels/w4a8.py, the scheme of llama.cpp's Q4_0): w ~ (q - 8) * s + z, q in [0, 15],
one (s, z) per group of `group_size` consecutive inputs of a row. Asymmetric: s = (max - min) / 15 and
z = min + 8 s, so q = 0 and 15 hit the group's min and max. Symmetric: z = 0 and s = absmax / 7. The
configured group size is a most: a matrix whose width it does not split uses the largest group size that
does (`group_for`), so every width that llama.cpp's 32-wide Q4_0 blocks take is accepted.

Activation-aware scaling (inference.awq): with a per-input scale s > 0, x W^T = (x / s) (W diag(s))^T, so
W diag(s) is what gets quantized and the layer multiplies its input by input_scale = 1 / s first. Scaling
up the inputs that carry large activations shrinks their relative rounding error.

On disk (`save_quantized`): safetensors, never pickle, in a portable layout (not the kernels' packed one,
which differs between CPU and GPU): per matrix NAME, `NAME.q` (int8 N x K, or uint8 N x K/2 holding two
INT4 values, low nibble first), `NAME.scale`, `NAME.zero` (INT4), `NAME.input_scale` (when calibrated);
every other tensor of the model as in model/io.py. `quantization.json` records the scheme.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernels import native, w4a8

GROUP_SIZES = (32, 64, 128)


@dataclass
class Int8Weight:
    q_NK: torch.Tensor  # int8
    scale_N: torch.Tensor  # fp32
    input_scale_K: torch.Tensor | None = None
    """Activation-aware scaling (inference.awq): the layer computes (x * input_scale) W^T."""

    def dequantize(self) -> torch.Tensor:
        return self.q_NK.float() * self.scale_N[:, None]


@dataclass
class Int4Weight:
    q_NK: torch.Tensor  # uint8 holding 0..15
    scale_NG: torch.Tensor  # fp32, G = K / group_size
    zero_NG: torch.Tensor  # fp32
    group_size: int
    input_scale_K: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        s = self.scale_NG.repeat_interleave(self.group_size, 1)
        z = self.zero_NG.repeat_interleave(self.group_size, 1)
        return (self.q_NK.float() - 8) * s + z


def quantize_int8(w_NK: torch.Tensor, input_scale_K: torch.Tensor | None = None) -> Int8Weight:
    w = _scaled(w_NK, input_scale_K)
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale, input_scale_K)


def quantize_int4(
    w_NK: torch.Tensor, group_size: int = 64, symmetric: bool = False, input_scale_K: torch.Tensor | None = None
) -> Int4Weight:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported INT4 group size {group_size}: use one of {GROUP_SIZES}")
    N, K = w_NK.shape
    if K % group_size:
        raise ValueError(f"a weight with {K} inputs cannot be split into groups of {group_size}")
    w = _scaled(w_NK, input_scale_K).view(N, K // group_size, group_size)
    if symmetric:
        scale = (w.abs().amax(-1) / 7).clamp_min(1e-12)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        zero = lo + 8 * scale
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return Int4Weight(q.view(N, K), scale, zero, group_size, input_scale_K)


def group_for(in_features: int, group_size: int) -> int | None:
    """The INT4 group a matrix of `in_features` inputs uses under a configured `group_size`: that size where
    the width splits into whole groups, else the largest smaller one in GROUP_SIZES that does (so every width
    llama.cpp's 32-wide Q4_0 blocks take is accepted: d_ff 480 quantizes at group 64 with 32-wide groups for
    its down projection); None when no group size divides the width."""
    fits = [g for g in GROUP_SIZES if g <= group_size and in_features % g == 0]
    return max(fits) if fits else None


def _scaled(w_NK: torch.Tensor, input_scale_K: torch.Tensor | None) -> torch.Tensor:
    w = w_NK.detach().float()
    return w if input_scale_K is None else w / input_scale_K[None, :]


def effective_weight(weight: Int8Weight | Int4Weight) -> torch.Tensor:
    """The matrix the quantized layer multiplies x by, in the original (unscaled) basis."""
    w = weight.dequantize()
    return w if weight.input_scale_K is None else w * weight.input_scale_K[None, :]


class _ScaledInput(nn.Module):
    def _set_input_scale(self, input_scale_K: torch.Tensor | None) -> None:
        self.register_buffer("input_scale", None if input_scale_K is None else input_scale_K.float())

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_scale is None else x * self.input_scale.to(x.dtype)


class Int8Linear(_ScaledInput):
    """y = x W^T with W in INT8 (per-channel scales), on torch's CPU kernel with bf16 activations: its
    fp32-activation path is 9-19x slower than the bf16 one (measured on the 2-core reference machine at 1 to
    64 rows). The kernel goes through kernels.native, which owns its preconditions: the weight is held in
    owned, aligned storage, and a width that is not a multiple of 16 is padded with zero columns (the
    activations get matching zeros, so the product is unchanged)."""

    def __init__(self, weight: Int8Weight):
        super().__init__()
        self.in_features = weight.q_NK.shape[1]
        pad = -self.in_features % native.INT8_K_MULTIPLE
        q = F.pad(weight.q_NK, (0, pad)) if pad else weight.q_NK
        self.register_buffer("q", native.owned(q))
        self.register_buffer("scale", native.owned(weight.scale_N.to(torch.bfloat16)))
        self._set_input_scale(weight.input_scale_K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = self._scale(x.reshape(-1, shape[-1]).float()).to(torch.bfloat16)
        pad = self.q.shape[1] - self.in_features
        y = native.int8_mm(F.pad(x2, (0, pad)) if pad else x2, self.q, self.scale)
        return y.view(*shape[:-1], y.shape[-1]).to(x.dtype)


class Int4Linear(_ScaledInput):
    """y = x W^T with W in group-wise INT4 on kernels.w4a8: the activations are quantized to INT8 per block of 32
    inputs, as llama.cpp's Q4_0 x Q8_0 product does, and the weight is read as packed nibbles, once per step for
    every row of the batch. Buffers in w4a8's layout of 16-row tiles: `packed` (tiles, in / 32, 256) uint8,
    `scale` and `min` (tiles, groups, 16) bf16 with w = q scale + min, i.e. min = zero - 8 scale."""

    def __init__(self, weight: Int4Weight):
        super().__init__()
        self.group_size = weight.group_size
        self.out_features, self.in_features = weight.q_NK.shape
        self.path = w4a8.level()
        """The kernel's instruction set, fixed when the layer is built (a compiled graph holds it as a constant)."""
        self.register_buffer("packed", w4a8.pack(weight.q_NK))
        self.register_buffer("scale", w4a8.tile_rows(weight.scale_NG))
        self.register_buffer("min", w4a8.tile_rows(weight.zero_NG - 8 * weight.scale_NG))
        self._set_input_scale(weight.input_scale_K)
        w4a8.load()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = self._scale(x.reshape(-1, shape[-1]).float())
        y = w4a8.linear(x2, self.packed, self.scale, self.min, self.out_features, self.group_size, self.path)
        return y.view(*shape[:-1], y.shape[-1]).to(x.dtype)


def stack_rows(layers: list[nn.Module]) -> Int8Linear | Int4Linear | None:
    """One quantized layer whose outputs are the given layers' outputs, in order: their weights concatenated, so
    that layers reading the same input (q/k/v, w1/w3, every expert's w1 and w3) run as one call, which reads the
    input once. Each output row is computed exactly as in its own layer. None unless the layers are all INT8, or
    all INT4 with the same group size and whole 16-row tiles, with the same input width and input scales."""
    first = layers[0]
    if not isinstance(first, (Int8Linear, Int4Linear)):
        return None
    if any(type(m) is not type(first) or m.in_features != first.in_features for m in layers):
        return None
    if isinstance(first, Int4Linear) and any(
        m.group_size != first.group_size or m.out_features % w4a8.ROWS or m.path != first.path for m in layers
    ):
        return None
    scales = [m.input_scale for m in layers]
    if any((s is None) != (scales[0] is None) or (s is not None and not torch.equal(s, scales[0])) for s in scales):
        return None
    fused = first.__class__.__new__(first.__class__)
    nn.Module.__init__(fused)
    fused.register_buffer("input_scale", scales[0])
    fused.in_features = first.in_features
    if isinstance(first, Int8Linear):
        fused.register_buffer("q", torch.cat([m.q for m in layers]))
        fused.register_buffer("scale", torch.cat([m.scale for m in layers]))
    else:
        fused.out_features = sum(m.out_features for m in layers)
        fused.group_size, fused.path = first.group_size, first.path
        for name in ("packed", "scale", "min"):
            fused.register_buffer(name, torch.cat([getattr(m, name) for m in layers]))
    return fused


@dataclass(frozen=True)
class QuantConfig:
    scheme: str  # "int8" or "int4"
    group_size: int = 64
    symmetric: bool = False
    awq: bool = False
    """Whether the weights were scaled by activation-aware calibration (inference.awq)."""

    def check(self) -> None:
        if self.scheme not in ("int8", "int4"):
            raise ValueError(f"scheme must be int8 or int4, not {self.scheme!r}")
        if self.scheme == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"unsupported INT4 group size {self.group_size}: use one of {GROUP_SIZES}")


def matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight matrix that quantization replaces, by name: each bias-free nn.Linear by its module
    path (a tied lm_head too: the embedding table stays in full precision for the lookup), and each
    routed expert's w1, w3, w2 as `<moe path>.experts.<e>.w1` etc. Routers and norms stay fp32."""
    from model.transformer import MoE

    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, MoE) and module.quantized is None:
            for e in range(module.config.n_routed_experts):
                out[f"{path}.experts.{e}.w1"] = module.w1_EFD[e]
                out[f"{path}.experts.{e}.w3"] = module.w3_EFD[e]
                out[f"{path}.experts.{e}.w2"] = module.w2_EDF[e]
        elif isinstance(module, nn.Linear) and module.bias is None:
            out[path] = module.weight
    return out


def check_quantizable(model: nn.Module, cfg: QuantConfig) -> None:
    """INT4: every matrix's input width must split into whole groups; the error names the first matrix that
    does not."""
    cfg.check()
    if cfg.scheme == "int4":
        for name, w in matrices(model).items():
            if group_for(w.shape[1], cfg.group_size) is None:
                raise ValueError(
                    f"{name}: a weight with {w.shape[1]} inputs cannot be split into groups of {cfg.group_size} "
                    f"or of any smaller INT4 group size {GROUP_SIZES}"
                )


def quantize_weights(
    model: nn.Module, cfg: QuantConfig, input_scales: dict[str, torch.Tensor] | None = None
) -> dict[str, Int8Weight | Int4Weight]:
    """Quantized versions of `matrices(model)`; input_scales (from inference.awq) by matrix name."""
    check_quantizable(model, cfg)
    input_scales = input_scales or {}
    out: dict[str, Int8Weight | Int4Weight] = {}
    for name, w in matrices(model).items():
        s = input_scales.get(name)
        try:
            out[name] = (
                quantize_int8(w, s)
                if cfg.scheme == "int8"
                else quantize_int4(w, group_for(w.shape[1], cfg.group_size), cfg.symmetric, s)
            )
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
    return out


def apply_quantized(model: nn.Module, weights: dict[str, Int8Weight | Int4Weight]) -> int:
    """Replace, in place, each matrix named in `weights` by its quantized layer; returns how many."""
    from model.transformer import MoE

    def layer(weight: Int8Weight | Int4Weight) -> nn.Module:
        return Int8Linear(weight) if isinstance(weight, Int8Weight) else Int4Linear(weight)

    names = set(weights)
    missing = sorted(set(matrices(model)) - names)
    if missing:
        raise ValueError(f"no quantized weight for {missing[:5]}")
    for path, module in list(model.named_modules()):
        if isinstance(module, MoE) and module.quantized is None:
            E = module.config.n_routed_experts
            module.quantized = nn.ModuleList(
                nn.ModuleList(layer(weights[f"{path}.experts.{e}.{w}"]) for w in ("w1", "w3", "w2")) for e in range(E)
            )
            del module.w1_EFD, module.w3_EFD, module.w2_EDF
    for name, weight in weights.items():
        if ".experts." in name:
            continue
        parent_path, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_path), child, layer(weight))
    return len(names)


def quantize_linears(
    model: nn.Module,
    scheme: str,
    group_size: int = 64,
    symmetric: bool = False,
    input_scales: dict[str, torch.Tensor] | None = None,
) -> int:
    """Quantize every matrix of `matrices(model)` in place; returns how many were quantized."""
    cfg = QuantConfig(scheme, group_size, symmetric, awq=input_scales is not None)
    return apply_quantized(model, quantize_weights(model, cfg, input_scales))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of the model (a tied table counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


QUANT_CONFIG_FILE = "quantization.json"


def save_quantized(
    model: nn.Module, weights: dict[str, Int8Weight | Int4Weight], cfg: QuantConfig, out_dir: Path
) -> None:
    """Write a quantized model: model/io.py's config.json plus the portable quantized tensors (see top)."""
    from model.io import save_model

    out_dir = Path(out_dir)
    names = set(matrices(model))
    if names != set(weights):
        raise ValueError("the quantized weights do not match the model's matrices")
    drop = {f"{n}.weight" for n in names if ".experts." not in n}
    moes = {n.split(".experts.")[0] for n in names if ".experts." in n}
    drop |= {f"{moe}.{stack}" for moe in moes for stack in ("w1_EFD", "w3_EFD", "w2_EDF")}
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    for name, w in weights.items():
        if isinstance(w, Int8Weight):
            state[f"{name}.q"], state[f"{name}.scale"] = w.q_NK, w.scale_N
        else:
            state[f"{name}.q"] = w.q_NK[:, 0::2] | (w.q_NK[:, 1::2] << 4)
            state[f"{name}.scale"], state[f"{name}.zero"] = w.scale_NG, w.zero_NG
        if w.input_scale_K is not None:
            state[f"{name}.input_scale"] = w.input_scale_K
    save_model(state, model.config, out_dir, extra={"quantization": dataclasses.asdict(cfg)})
    (out_dir / QUANT_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def load_quantized(run_dir: Path) -> nn.Module:
    """The Transformer saved by `save_quantized`, with quantized layers, in eval mode. Every name and
    shape is checked against config.json and quantization.json, naming the file that is wrong."""
    from model.io import CONFIG_FILE, WEIGHTS_FILE, check_tensors, load_config, read_tensors
    from model.transformer import Transformer, rope_tables

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    qpath, wpath = run_dir / QUANT_CONFIG_FILE, run_dir / WEIGHTS_FILE
    if not qpath.exists():
        raise ValueError(f"{qpath}: missing: not a quantized model folder")
    try:
        cfg = QuantConfig(**json.loads(qpath.read_text()))
        cfg.check()
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{qpath}: not a quantization config ({e})") from e
    tensors = read_tensors(wpath)
    with torch.device("meta"):  # never materialize the fp32 weights this model replaces
        model = Transformer(config)
    shapes = matrices(model)
    weights: dict[str, Int8Weight | Int4Weight] = {}
    for name, w in shapes.items():
        N, K = w.shape
        expected = {f"{name}.q": (N, K) if cfg.scheme == "int8" else (N, K // 2)}
        if cfg.scheme == "int8":
            expected[f"{name}.scale"] = (N,)
        else:
            group = group_for(K, cfg.group_size)
            if group is None:
                raise ValueError(
                    f"{qpath}: {name} has {K} inputs, which no INT4 group of at most {cfg.group_size} splits"
                )
            expected[f"{name}.scale"] = expected[f"{name}.zero"] = (N, K // group)
        if f"{name}.input_scale" in tensors:
            expected[f"{name}.input_scale"] = (K,)
        for key, shape in expected.items():
            if key not in tensors:
                raise ValueError(f"{wpath}: missing {key} ({cfg.scheme} {CONFIG_FILE} and {QUANT_CONFIG_FILE})")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{wpath}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        t = {key.removeprefix(f"{name}."): tensors.pop(key) for key in expected}
        if cfg.scheme == "int8":
            weights[name] = Int8Weight(t["q"], t["scale"], t.get("input_scale"))
        else:
            q = torch.stack([t["q"] & 15, t["q"] >> 4], -1).view(N, K)
            weights[name] = Int4Weight(q, t["scale"], t["zero"], group, t.get("input_scale"))
    apply_quantized(model, weights)
    quantized_layers = {f"{n}." for n in shapes}
    expected = {k: v.shape for k, v in model.state_dict().items() if ".quantized." not in k}
    check_tensors(wpath, tensors, {k: v for k, v in expected.items() if not k.startswith(tuple(quantized_layers))})
    model.load_state_dict(tensors, strict=False, assign=True)
    model.rope_cos, model.rope_sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    return model.eval()
