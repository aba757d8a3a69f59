"""INT8 KV cache quantization, in the layout of inference/runtime/kv_cache.py: keys or values x (B, G, T, Dh).

Per token (what Int8LayerCache stores): one symmetric scale per (batch, kv head, position),
s = max(absmax over Dh / 127, 1e-12), q = round(x / s) clamped to [-127, 127], x ~ q s. The rounding error
is at most s / 2 and the scale travels with the token (B, G, T, 1), so appending to the cache never
requantizes older positions.

Per channel: a static scale (G, Dh) calibrated once (inference/runtime/kv_cache.py's calibrate_channel_scales:
absmax over calibration text / 127), the same q = round(x / s) clamp. Keys have outlier channels that
per-token scales spread over the whole token; a channel scale isolates them, at the price of clipping
anything beyond the calibration range.

Rounding is half to even, like torch.round. The Triton kernels divide with tl.math.div_rn (IEEE, where
`/` is an approximate division on GPUs) and round with floor and an exact tie test (libdevice.rint has no
interpreter implementation), so they give the reference's bytes, not just close values.

Kernels see x as R = B G T rows of Dh, row r = (b G + g) T + t, read through the tensor's strides (so a
transposed (B, T, G, Dh) -> (B, G, T, Dh) view needs no copy); each program takes BLOCK_R rows of one
power-of-two BLOCK_D >= Dh wide tile. Outputs are new contiguous tensors.

Shape legend: B batch, G kv heads, T positions, Dh head dim, R rows (B G T).
"""

from __future__ import annotations

import torch

from kernels.dispatch import jit, tl, triton, use_triton

TILE_ELEMENTS = 4096  # BLOCK_R * BLOCK_D per program


def quantize_per_token_reference(x_BGTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_BGTD = x_BGTD.float()
    scale_BGT1 = (x_BGTD.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(x_BGTD / scale_BGT1).clamp(-127, 127).to(torch.int8), scale_BGT1


def quantize_per_channel_reference(x_BGTD: torch.Tensor, scale_GD: torch.Tensor) -> torch.Tensor:
    return torch.round(x_BGTD.float() / scale_GD[:, None, :]).clamp(-127, 127).to(torch.int8)


def dequantize_reference(q_BGTD: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x ~ q s, for a per-token scale (B, G, T, 1) or a per-channel one broadcast as (G, 1, Dh) or
    (1, G, 1, Dh)."""
    return (q_BGTD.float() * scale.float()).to(dtype)


@jit
def _round_half_even(y):
    """torch.round for fp32: |y| - floor(|y|) is exact, so halves are told apart from near-halves."""
    a = tl.abs(y)
    whole = tl.floor(a)
    frac = a - whole
    up = (frac > 0.5) | ((frac == 0.5) & (whole % 2 == 1))
    whole = tl.where(up, whole + 1.0, whole)
    return tl.where(y < 0, -whole, whole)


@jit
def _offsets(rows, cols, G, T, stride_b, stride_g, stride_t, stride_d):
    """Element offsets (rows x cols) of a strided (B, G, T, Dh) tensor, row r = (b G + g) T + t."""
    rows = rows.to(tl.int64)
    b, g, t = rows // (G * T), (rows // T) % G, rows % T
    return (b * stride_b + g * stride_g + t * stride_t)[:, None] + cols[None, :] * stride_d


@jit
def _quantize_per_token_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    R,
    G,
    T,
    Dh,
    stride_xb,
    stride_xg,
    stride_xt,
    stride_xd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    in_r = rows < R
    mask = in_r[:, None] & (cols < Dh)[None, :]
    x_offsets = _offsets(rows, cols, G, T, stride_xb, stride_xg, stride_xt, stride_xd)
    x_RD = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    scale_R = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x_RD), axis=1), 127.0), 1e-12)
    q_RD = _round_half_even(tl.math.div_rn(x_RD, scale_R[:, None]))
    q_RD = tl.minimum(tl.maximum(q_RD, -127.0), 127.0)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * Dh + cols[None, :], q_RD.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, scale_R, mask=in_r)


@jit
def _quantize_static_kernel(
    x_ptr,
    scale_ptr,
    q_ptr,
    R,
    G,
    T,
    Dh,
    stride_xb,
    stride_xg,
    stride_xt,
    stride_xd,
    stride_sb,
    stride_sg,
    stride_st,
    stride_sd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """q = round(x / s) clamped, s a given scale broadcast to (B, G, T, Dh) (zero strides)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < Dh)[None, :]
    x_offsets = _offsets(rows, cols, G, T, stride_xb, stride_xg, stride_xt, stride_xd)
    s_offsets = _offsets(rows, cols, G, T, stride_sb, stride_sg, stride_st, stride_sd)
    x_RD = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    s_RD = tl.load(scale_ptr + s_offsets, mask=mask, other=1.0)
    q_RD = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x_RD, s_RD)), -127.0), 127.0)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * Dh + cols[None, :], q_RD.to(tl.int8), mask=mask)


@jit
def _dequantize_kernel(
    q_ptr,
    scale_ptr,
    x_ptr,
    R,
    G,
    T,
    Dh,
    stride_qb,
    stride_qg,
    stride_qt,
    stride_qd,
    stride_sb,
    stride_sg,
    stride_st,
    stride_sd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """x = q s, s broadcast to (B, G, T, Dh) (zero strides), written in x's dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < Dh)[None, :]
    q_offsets = _offsets(rows, cols, G, T, stride_qb, stride_qg, stride_qt, stride_qd)
    s_offsets = _offsets(rows, cols, G, T, stride_sb, stride_sg, stride_st, stride_sd)
    q_RD = tl.load(q_ptr + q_offsets, mask=mask, other=0).to(tl.float32)
    s_RD = tl.load(scale_ptr + s_offsets, mask=mask, other=0.0)
    x_RD = q_RD * s_RD
    tl.store(x_ptr + rows[:, None].to(tl.int64) * Dh + cols[None, :], x_RD.to(x_ptr.dtype.element_ty), mask=mask)


def _tiles(shape: torch.Size) -> tuple[int, int, int, tuple[int]]:
    """R, BLOCK_R, BLOCK_D and the 1-D grid for a (B, G, T, Dh) tensor."""
    B, G, T, Dh = shape
    block_d = triton.next_power_of_2(Dh)
    block_r = max(1, TILE_ELEMENTS // block_d)
    R = B * G * T
    return R, block_r, block_d, (triton.cdiv(R, block_r),)


def quantize_per_token_triton(x_BGTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, G, T, Dh = x_BGTD.shape
    q_BGTD = torch.empty(B, G, T, Dh, dtype=torch.int8, device=x_BGTD.device)
    scale_BGT1 = torch.empty(B, G, T, 1, dtype=torch.float32, device=x_BGTD.device)
    R, block_r, block_d, grid = _tiles(x_BGTD.shape)
    _quantize_per_token_kernel[grid](
        x_BGTD, q_BGTD, scale_BGT1, R, G, T, Dh, *x_BGTD.stride(), BLOCK_R=block_r, BLOCK_D=block_d
    )
    return q_BGTD, scale_BGT1


def quantize_per_channel_triton(x_BGTD: torch.Tensor, scale_GD: torch.Tensor) -> torch.Tensor:
    B, G, T, Dh = x_BGTD.shape
    q_BGTD = torch.empty(B, G, T, Dh, dtype=torch.int8, device=x_BGTD.device)
    scale_BGTD = scale_GD.float()[None, :, None, :].expand(B, G, T, Dh)
    R, block_r, block_d, grid = _tiles(x_BGTD.shape)
    _quantize_static_kernel[grid](
        x_BGTD,
        scale_BGTD,
        q_BGTD,
        R,
        G,
        T,
        Dh,
        *x_BGTD.stride(),
        *scale_BGTD.stride(),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return q_BGTD


def dequantize_triton(q_BGTD: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, G, T, Dh = q_BGTD.shape
    x_BGTD = torch.empty(B, G, T, Dh, dtype=dtype, device=q_BGTD.device)
    scale_BGTD = scale.float().expand(B, G, T, Dh)
    R, block_r, block_d, grid = _tiles(q_BGTD.shape)
    _dequantize_kernel[grid](
        q_BGTD,
        scale_BGTD,
        x_BGTD,
        R,
        G,
        T,
        Dh,
        *q_BGTD.stride(),
        *scale_BGTD.stride(),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return x_BGTD


def quantize_per_token(x_BGTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (B, G, T, Dh), scale fp32 (B, G, T, 1)): Triton on CUDA (or FRUGAL_FORCE_TRITON=1), else torch."""
    if use_triton(x_BGTD):
        return quantize_per_token_triton(x_BGTD)
    return quantize_per_token_reference(x_BGTD)


def quantize_per_channel(x_BGTD: torch.Tensor, scale_GD: torch.Tensor) -> torch.Tensor:
    """q int8 (B, G, T, Dh) for a static scale (G, Dh): Triton on CUDA (or forced), else torch."""
    if scale_GD.shape != (x_BGTD.shape[1], x_BGTD.shape[3]):
        raise ValueError(f"a per-channel scale for x {tuple(x_BGTD.shape)} is (G, Dh), not {tuple(scale_GD.shape)}")
    if use_triton(x_BGTD):
        return quantize_per_channel_triton(x_BGTD, scale_GD)
    return quantize_per_channel_reference(x_BGTD, scale_GD)


def dequantize(q_BGTD: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q s in `dtype`; scale (B, G, T, 1) per token, or per channel (G, 1, Dh) or (1, G, 1, Dh)."""
    if use_triton(q_BGTD):
        return dequantize_triton(q_BGTD, scale, dtype)
    return dequantize_reference(q_BGTD, scale, dtype)
