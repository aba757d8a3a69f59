"""Weight-only quantization: INT8 per output channel, INT4 group-wise (32, 64 or 128 inputs per group,
symmetric or asymmetric), with torch's native CPU kernels for the matmuls.

INT8: w ~ q * s, q in [-127, 127], one s per output row (`aten._weight_int8pack_mm`).
INT4 (the tinygemm layout of `aten._weight_int4pack_mm_for_cpu`): w ~ (q - 8) * s + z, q in [0, 15],
one (s, z) per group of `group_size` consecutive inputs of a row. Asymmetric: s = (max - min) / 15 and
z = min + 8 s, so q = 0 and 15 hit the group's min and max. Symmetric: z = 0 and s = absmax / 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128)


@dataclass
class Int8Weight:
    q_NK: torch.Tensor  # int8
    scale_N: torch.Tensor  # fp32

    def dequantize(self) -> torch.Tensor:
        return self.q_NK.float() * self.scale_N[:, None]


@dataclass
class Int4Weight:
    q_NK: torch.Tensor  # uint8 holding 0..15
    scale_NG: torch.Tensor  # fp32, G = K / group_size
    zero_NG: torch.Tensor  # fp32
    group_size: int

    def dequantize(self) -> torch.Tensor:
        s = self.scale_NG.repeat_interleave(self.group_size, 1)
        z = self.zero_NG.repeat_interleave(self.group_size, 1)
        return (self.q_NK.float() - 8) * s + z


def quantize_int8(w_NK: torch.Tensor) -> Int8Weight:
    w = w_NK.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def quantize_int4(w_NK: torch.Tensor, group_size: int = 64, symmetric: bool = False) -> Int4Weight:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported INT4 group size {group_size}: use one of {GROUP_SIZES}")
    N, K = w_NK.shape
    if K % group_size:
        raise ValueError(f"a weight with {K} inputs cannot be split into groups of {group_size}")
    w = w_NK.detach().float().view(N, K // group_size, group_size)
    if symmetric:
        scale = (w.abs().amax(-1) / 7).clamp_min(1e-12)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        zero = lo + 8 * scale
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return Int4Weight(q.view(N, K), scale, zero, group_size)


class Int8Linear(nn.Module):
    """y = x W^T with W in INT8 (per-channel scales)."""

    def __init__(self, weight: Int8Weight):
        super().__init__()
        self.register_buffer("q", weight.q_NK)
        self.register_buffer("scale", weight.scale_N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).float(), self.q, self.scale)
        return y.view(*shape[:-1], -1).to(x.dtype)


class Int4Linear(nn.Module):
    """y = x W^T with W in group-wise INT4, on torch's packed CPU kernel (bf16 activations inside)."""

    def __init__(self, weight: Int4Weight):
        super().__init__()
        self.group_size = weight.group_size
        self.out_features, self.in_features = weight.q_NK.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q_NK.to(torch.int32), 2)
        self.register_buffer("packed", packed)
        scales_and_zeros = torch.stack([weight.scale_NG.t(), weight.zero_NG.t()], -1).contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.view(*shape[:-1], -1).to(x.dtype)


def quantize_linears(model: nn.Module, scheme: str, group_size: int = 64, symmetric: bool = False) -> int:
    """Replace, in place, every bias-free nn.Linear and every routed expert's three matrices by their
    INT8 or INT4 versions; returns how many matrices were quantized. A tied lm_head is quantized too
    (the embedding table stays in full precision for the lookup); routers and norms stay fp32."""
    from model.transformer import MoE

    if scheme not in ("int8", "int4"):
        raise ValueError(f"scheme must be int8 or int4, not {scheme!r}")

    def quantized(w: torch.Tensor) -> nn.Module:
        return Int8Linear(quantize_int8(w)) if scheme == "int8" else Int4Linear(quantize_int4(w, group_size, symmetric))

    replaced = 0
    for parent in list(model.modules()):
        if isinstance(parent, MoE) and parent.quantized is None:
            experts = nn.ModuleList(
                nn.ModuleList([quantized(parent.w1_EFD[e]), quantized(parent.w3_EFD[e]), quantized(parent.w2_EDF[e])])
                for e in range(parent.config.n_routed_experts)
            )
            del parent.w1_EFD, parent.w3_EFD, parent.w2_EDF
            parent.quantized = experts
            replaced += 3 * len(experts)
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, quantized(child.weight))
                replaced += 1
    return replaced
