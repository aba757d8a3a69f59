"""Attention that reads an INT8 KV cache through block tables (inference.runtime.engine.paged_cache's layout),
for a batch of sequences each bringing its own run of new queries: the serving engine's attention on a GPU.

Layout: keys and values (num_blocks, block_size, G, Dh) int8; position s of sequence b lives in block
block_tables[b, s // block_size] at offset s % block_size. Scales: per token (num_blocks, block_size, G, 1)
fp32, or per channel (G, Dh) fp32, static. Queries q (B, H, T, Dh) sit at positions positions[b, t] and see
keys 0 .. positions[b, t]; padding queries sit at position 0 (their outputs are discarded).

o_i = sum_j softmax_j(q_i . k_j / sqrt(Dh)) v_j, k_j = kq_j ks_j, v_j = vq_j vs_j. Per token, key j's scale
multiplies column j of the scores and value j's scale its row of vq before p v (as kernels/attention_int8.py
does). Per channel the scales are constant over keys, so they move out of the sums: q . (kq ks) = (q ks) . kq,
and sum_j p_j (vq_j vs) = (sum_j p_j vq_j) vs.

Kernel: one program per (sequence, kv head), whose R = (H / G) T rows share that kv head's cache reads; it
walks the sequence's keys BLOCK_S at a time, looking up each key's block in the table, with the online
softmax in base 2 (scores scaled by log2(e) / sqrt(Dh)); fp32 accumulation.

Shape legend: B sequences, H query heads, G kv heads, T new positions per sequence (padded), Dh head dim,
M blocks per table, NB blocks in the cache, BS block size, R rows of one program.
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import jit, tl, triton, use_triton


def paged_attention_int8_reference(
    q_BHTD: torch.Tensor,
    k_q: torch.Tensor,
    k_scale: torch.Tensor,
    v_q: torch.Tensor,
    v_scale: torch.Tensor,
    block_tables_BM: torch.Tensor,
    positions_BT: torch.Tensor,
) -> torch.Tensor:
    """Plain torch in fp32: gather each sequence's blocks, dequantize, repeat kv heads, masked softmax."""
    H, Dh, G = q_BHTD.shape[1], q_BHTD.shape[3], k_q.shape[2]

    def gather(x_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = x_q[block_tables_BM].flatten(1, 2).float()  # (B, S, G, Dh)
        s = scale[block_tables_BM].flatten(1, 2) if scale.dim() == 4 else scale[None, None]
        return (x * s).transpose(1, 2).repeat_interleave(H // G, 1)  # (B, H, S, Dh)

    k_BHSD, v_BHSD = gather(k_q, k_scale), gather(v_q, v_scale)
    scores = q_BHTD.float() @ k_BHSD.transpose(-1, -2) / math.sqrt(Dh)
    S = k_BHSD.shape[2]
    visible_BTS = torch.arange(S, device=q_BHTD.device)[None, None, :] <= positions_BT[:, :, None]
    scores = scores.masked_fill(~visible_BTS[:, None], float("-inf"))
    return (scores.softmax(-1) @ v_BHSD).to(q_BHTD.dtype)


@jit
def _paged_attention_int8_kernel(
    q_ptr, k_ptr, k_scale_ptr, v_ptr, v_scale_ptr, table_ptr, pos_ptr, end_ptr, o_ptr,
    T, G, n_rep, Dh, block_size, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kn, stride_ko, stride_kg, stride_kd,
    stride_sn, stride_so, stride_sg, stride_sd,
    stride_tb, stride_tm, stride_pb, stride_pt,
    stride_ob, stride_oh, stride_ot, stride_od,
    PER_CHANNEL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(0) // G).to(tl.int64)
    g = tl.program_id(0) % G
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    in_r, in_d = rows < n_rep * T, cols < Dh
    head_R, t_R = g * n_rep + rows // T, rows % T
    pos_R = tl.load(pos_ptr + b * stride_pb + t_R * stride_pt, mask=in_r, other=0)
    q_offsets = b * stride_qb + head_R * stride_qh + t_R * stride_qt
    q_RD = tl.load(q_ptr + q_offsets[:, None] + cols[None, :] * stride_qd, mask=in_r[:, None] & in_d[None, :],
                   other=0.0)  # fmt: skip
    if PER_CHANNEL:  # q . (kq ks) = (q ks) . kq
        k_scale_D = tl.load(k_scale_ptr + g * stride_sg + cols * stride_sd, mask=in_d, other=0.0)
        q_RD = (q_RD.to(tl.float32) * k_scale_D[None, :]).to(q_RD.dtype)
    m_R = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_R = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc_RD = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    end = tl.load(end_ptr + b)
    for s0 in range(0, end, BLOCK_S):
        keys = s0 + tl.arange(0, BLOCK_S)
        in_s = keys < end
        block_S = tl.load(table_ptr + b * stride_tb + (keys // block_size) * stride_tm, mask=in_s, other=0)
        slot_S = block_S.to(tl.int64) * stride_kn + (keys % block_size) * stride_ko + g * stride_kg
        kv_mask = in_s[:, None] & in_d[None, :]
        k_SD = tl.load(k_ptr + slot_S[:, None] + cols[None, :] * stride_kd, mask=kv_mask, other=0)
        scores_RS = tl.dot(q_RD, tl.trans(k_SD.to(q_RD.dtype))) * qk_scale
        v_SD = tl.load(v_ptr + slot_S[:, None] + cols[None, :] * stride_kd, mask=kv_mask, other=0).to(tl.float32)
        if not PER_CHANNEL:
            scale_S = block_S.to(tl.int64) * stride_sn + (keys % block_size) * stride_so + g * stride_sg
            scores_RS = scores_RS * tl.load(k_scale_ptr + scale_S, mask=in_s, other=0.0)[None, :]
            v_SD = v_SD * tl.load(v_scale_ptr + scale_S, mask=in_s, other=0.0)[:, None]
        # key 0 is visible to every row (padding rows sit at position 0): m_R is finite after the first tile
        scores_RS = tl.where(keys[None, :] <= pos_R[:, None], scores_RS, float("-inf"))
        m_new_R = tl.maximum(m_R, tl.max(scores_RS, axis=1))
        alpha_R = tl.exp2(m_R - m_new_R)
        p_RS = tl.exp2(scores_RS - m_new_R[:, None])
        l_R = l_R * alpha_R + tl.sum(p_RS, axis=1)
        acc_RD = acc_RD * alpha_R[:, None] + tl.dot(p_RS.to(q_RD.dtype), v_SD.to(q_RD.dtype))
        m_R = m_new_R
    o_RD = acc_RD / l_R[:, None]
    if PER_CHANNEL:  # sum_j p_j (vq_j vs) = (sum_j p_j vq_j) vs
        o_RD = o_RD * tl.load(v_scale_ptr + g * stride_sg + cols * stride_sd, mask=in_d, other=0.0)[None, :]
    o_offsets = b * stride_ob + head_R * stride_oh + t_R * stride_ot
    tl.store(o_ptr + o_offsets[:, None] + cols[None, :] * stride_od, o_RD.to(o_ptr.dtype.element_ty),
             mask=in_r[:, None] & in_d[None, :])  # fmt: skip


def paged_attention_int8_triton(q_BHTD, k_q, k_scale, v_q, v_scale, block_tables_BM, positions_BT) -> torch.Tensor:
    B, H, T, Dh = q_BHTD.shape
    G, block_size = k_q.shape[2], k_q.shape[1]
    per_channel = k_scale.dim() == 2
    o_BHTD = torch.empty_like(q_BHTD)
    ends_B = (positions_BT.max(1).values + 1).to(torch.int32)
    scale_strides = (0, 0, *k_scale.stride()) if per_channel else k_scale.stride()
    if per_channel:
        assert k_scale.stride() == v_scale.stride()
    else:
        assert k_scale.stride() == v_scale.stride() and k_q.stride() == v_q.stride()
    _paged_attention_int8_kernel[(B * G,)](
        q_BHTD, k_q, k_scale, v_q, v_scale, block_tables_BM, positions_BT, ends_B, o_BHTD,
        T, G, H // G, Dh, block_size, math.log2(math.e) / math.sqrt(Dh),
        *q_BHTD.stride(), *k_q.stride(), *scale_strides, *block_tables_BM.stride(), *positions_BT.stride(),
        *o_BHTD.stride(),
        PER_CHANNEL=per_channel,
        BLOCK_R=max(16, triton.next_power_of_2((H // G) * T)),  # tl.dot tiles are at least 16 wide
        BLOCK_S=max(16, min(64, triton.next_power_of_2(block_size))),
        BLOCK_D=max(16, triton.next_power_of_2(Dh)),
    )  # fmt: skip
    return o_BHTD


def paged_attention_int8(q_BHTD, k_q, k_scale, v_q, v_scale, block_tables_BM, positions_BT) -> torch.Tensor:
    """o (B, H, T, Dh) over the paged INT8 cache: Triton on CUDA (or FRUGAL_FORCE_TRITON=1), else torch."""
    H, G = q_BHTD.shape[1], k_q.shape[2]
    if H % G:
        raise ValueError(f"{H} query heads cannot share {G} kv heads")
    if use_triton(q_BHTD):
        return paged_attention_int8_triton(q_BHTD, k_q, k_scale, v_q, v_scale, block_tables_BM, positions_BT)
    return paged_attention_int8_reference(q_BHTD, k_q, k_scale, v_q, v_scale, block_tables_BM, positions_BT)
