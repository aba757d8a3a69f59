"""Decode attention that reads the INT8 KV cache (kernels/kv_int8.py, per-token scales) directly.

o_i = sum_j softmax_j(q_i . k_j / sqrt(Dh)) v_j with k_j = kq_j ks_j and v_j = vq_j vs_j. Query i of the T
new positions sits at position start_pos + i and sees keys 0 .. start_pos + i (causal); query head h reads
kv head h // (H / G) (grouped-query attention). Keys at start_pos + T and beyond are never read.

Kernel: one program per (batch, kv head). Its rows are the R = (H / G) T (query head, new position) pairs
that share that kv head, so each cached key and value is loaded once per group instead of once per query
head: decoding is bound by reading the cache, and this is the read. It walks the keys in BLOCK_S blocks with
the online softmax (running max m, running sum l, rescaled accumulator), in base 2: scores are scaled by
log2(e) / sqrt(Dh) so exp2 replaces exp. Dequantization happens in registers: a key's scale multiplies its
score column after q kq^T (kq's integers are exact in fp16 and bf16), a value block is dequantized
(vq vs, fp32, then the query's dtype) before p v. Accumulation is fp32; the output has the query's dtype.

Shape legend: B batch, H query heads, G kv heads, T new positions, S cache length, Dh head dim,
R rows of one program ((H / G) T, padded to BLOCK_R).
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import jit, tl, triton, use_triton
from kernels.kv_int8 import dequantize_reference


def causal_mask(start_pos: int, T: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, start_pos + T) bool: query i (at start_pos + i) sees key j iff j <= start_pos + i."""
    return torch.arange(start_pos + T, device=device)[None, :] <= start_pos + torch.arange(T, device=device)[:, None]


def attention_int8_reference(
    q_BHTD: torch.Tensor,
    k_q_BGSD: torch.Tensor,
    k_scale_BGS1: torch.Tensor,
    v_q_BGSD: torch.Tensor,
    v_scale_BGS1: torch.Tensor,
    start_pos: int,
) -> torch.Tensor:
    """Plain torch in fp32: dequantize the visible cache, repeat kv heads, masked softmax attention."""
    H, T, Dh = q_BHTD.shape[1:]
    G, end = k_q_BGSD.shape[1], start_pos + T
    k_BHSD = dequantize_reference(k_q_BGSD[:, :, :end], k_scale_BGS1[:, :, :end]).repeat_interleave(H // G, 1)
    v_BHSD = dequantize_reference(v_q_BGSD[:, :, :end], v_scale_BGS1[:, :, :end]).repeat_interleave(H // G, 1)
    scores_BHTS = q_BHTD.float() @ k_BHSD.transpose(-1, -2) / math.sqrt(Dh)
    scores_BHTS = scores_BHTS.masked_fill(~causal_mask(start_pos, T, q_BHTD.device), float("-inf"))
    return (scores_BHTS.softmax(-1) @ v_BHSD).to(q_BHTD.dtype)


@jit
def _attention_int8_kernel(
    q_ptr,
    k_ptr,
    k_scale_ptr,
    v_ptr,
    v_scale_ptr,
    o_ptr,
    start_pos,
    T,
    G,
    n_rep,
    Dh,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kg,
    stride_ks,
    stride_kd,
    stride_ksb,
    stride_ksg,
    stride_kss,
    stride_vb,
    stride_vg,
    stride_vs,
    stride_vd,
    stride_vsb,
    stride_vsg,
    stride_vss,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = (tl.program_id(0) // G).to(tl.int64)  # b * stride_kb passes 2^31 in large caches
    g = tl.program_id(0) % G
    rows = tl.arange(0, BLOCK_R)
    head_R = g * n_rep + rows // T
    pos_R = start_pos + rows % T
    cols = tl.arange(0, BLOCK_D)
    in_r, in_d = rows < n_rep * T, cols < Dh
    q_offsets = b * stride_qb + head_R * stride_qh + (rows % T) * stride_qt
    q_RD = tl.load(
        q_ptr + q_offsets[:, None] + cols[None, :] * stride_qd, mask=in_r[:, None] & in_d[None, :], other=0.0
    )
    m_R = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_R = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc_RD = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    end = start_pos + T
    for s0 in range(0, end, BLOCK_S):
        keys = s0 + tl.arange(0, BLOCK_S)
        in_s = keys < end
        kv_mask = in_s[:, None] & in_d[None, :]
        k_offsets = b * stride_kb + g * stride_kg + keys[:, None] * stride_ks + cols[None, :] * stride_kd
        k_SD = tl.load(k_ptr + k_offsets, mask=kv_mask, other=0)
        k_scale_S = tl.load(k_scale_ptr + b * stride_ksb + g * stride_ksg + keys * stride_kss, mask=in_s, other=0.0)
        # q . (kq ks) = (q . kq) ks: the scale of key j multiplies column j of the scores
        scores_RS = tl.dot(q_RD, tl.trans(k_SD.to(q_RD.dtype))) * (k_scale_S * qk_scale)[None, :]
        # key 0 is visible to every row, so m_R is finite after the first block and no row divides 0 by 0
        scores_RS = tl.where(keys[None, :] <= pos_R[:, None], scores_RS, float("-inf"))
        m_new_R = tl.maximum(m_R, tl.max(scores_RS, axis=1))
        alpha_R = tl.exp2(m_R - m_new_R)
        p_RS = tl.exp2(scores_RS - m_new_R[:, None])
        l_R = l_R * alpha_R + tl.sum(p_RS, axis=1)
        v_offsets = b * stride_vb + g * stride_vg + keys[:, None] * stride_vs + cols[None, :] * stride_vd
        v_scale_S = tl.load(v_scale_ptr + b * stride_vsb + g * stride_vsg + keys * stride_vss, mask=in_s, other=0.0)
        v_SD = (tl.load(v_ptr + v_offsets, mask=kv_mask, other=0).to(tl.float32) * v_scale_S[:, None]).to(q_RD.dtype)
        acc_RD = acc_RD * alpha_R[:, None] + tl.dot(p_RS.to(q_RD.dtype), v_SD)
        m_R = m_new_R
    o_offsets = b * stride_ob + head_R * stride_oh + (rows % T) * stride_ot
    o_RD = (acc_RD / l_R[:, None]).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + o_offsets[:, None] + cols[None, :] * stride_od, o_RD, mask=in_r[:, None] & in_d[None, :])


def attention_int8_triton(
    q_BHTD: torch.Tensor,
    k_q_BGSD: torch.Tensor,
    k_scale_BGS1: torch.Tensor,
    v_q_BGSD: torch.Tensor,
    v_scale_BGS1: torch.Tensor,
    start_pos: int,
    block_s: int = 64,
) -> torch.Tensor:
    B, H, T, Dh = q_BHTD.shape
    G = k_q_BGSD.shape[1]
    o_BHTD = torch.empty_like(q_BHTD)
    n_rep = H // G
    _attention_int8_kernel[(B * G,)](
        q_BHTD,
        k_q_BGSD,
        k_scale_BGS1,
        v_q_BGSD,
        v_scale_BGS1,
        o_BHTD,
        start_pos,
        T,
        G,
        n_rep,
        Dh,
        math.log2(math.e) / math.sqrt(Dh),
        *q_BHTD.stride(),
        *k_q_BGSD.stride(),
        *k_scale_BGS1.stride()[:3],
        *v_q_BGSD.stride(),
        *v_scale_BGS1.stride()[:3],
        *o_BHTD.stride(),
        BLOCK_R=max(16, triton.next_power_of_2(n_rep * T)),  # tl.dot tiles are at least 16 wide
        BLOCK_S=block_s,
        BLOCK_D=max(16, triton.next_power_of_2(Dh)),
    )
    return o_BHTD


def attention_int8(
    q_BHTD: torch.Tensor,
    k_q_BGSD: torch.Tensor,
    k_scale_BGS1: torch.Tensor,
    v_q_BGSD: torch.Tensor,
    v_scale_BGS1: torch.Tensor,
    start_pos: int,
) -> torch.Tensor:
    """o (B, H, T, Dh) for T new queries at start_pos.. over the INT8 cache: Triton on CUDA (or
    FRUGAL_FORCE_TRITON=1), else the torch reference."""
    H, T = q_BHTD.shape[1:3]
    G, S = k_q_BGSD.shape[1:3]
    if H % G:
        raise ValueError(f"{H} query heads cannot share {G} kv heads")
    if start_pos + T > S:
        raise ValueError(f"queries up to position {start_pos + T - 1} need a cache of {start_pos + T}, not {S}")
    if use_triton(q_BHTD):
        return attention_int8_triton(q_BHTD, k_q_BGSD, k_scale_BGS1, v_q_BGSD, v_scale_BGS1, start_pos)
    return attention_int8_reference(q_BHTD, k_q_BGSD, k_scale_BGS1, v_q_BGSD, v_scale_BGS1, start_pos)
