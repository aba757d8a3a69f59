"""W4A16: y = x W^T with W in group-wise INT4 and x in 16-bit (or fp32) floats.

Weights follow inference/runtime/quantize.py's Int4Weight: q in [0, 15], one fp32 scale s and zero z per group of
`group_size` consecutive inputs of a row, w = (q - 8) s + z.

Packing: two nibbles per byte along K, rows kept in order. Byte p of row n holds q[n, 2p] in its low
nibble and q[n, 2p + 1] in its high nibble, so packed_NP is row-major (N, K / 2) and one group of a row is
one contiguous run of group_size / 2 bytes. The kernel loads a (BLOCK_N, group_size / 2) byte tile, splits
the nibbles and interleaves them back into K order in registers (tl.join + reshape): each weight byte is
read from memory once, which is the point of W4A16 in memory-bound decoding.

Kernel: one program per (BLOCK_M, BLOCK_N) tile of y; the loop over K takes one quantization group per step
(BLOCK_K = group_size), so each step needs a single (s, z) per output row, dequantizes w = q s + (z - 8 s)
in fp32, casts it to x's dtype and accumulates x w^T in fp32 with tl.dot (fp32 activations run as TF32 on
tensor cores). The result is cast back to x's dtype.

Shape legend: M activation rows (tokens), K inputs, N outputs, P = K / 2 packed bytes per row,
G = K / group_size groups per row, C = group_size inputs in one group.
"""

from __future__ import annotations

import torch

from kernels.dispatch import jit, tl, triton, use_triton


def pack_int4(q_NK: torch.Tensor) -> torch.Tensor:
    """q in [0, 15] (any integer dtype, K even) -> uint8 (N, K / 2): low nibble q[:, 2p], high q[:, 2p + 1]."""
    q_NK = q_NK.to(torch.uint8)
    return q_NK[:, 0::2] | (q_NK[:, 1::2] << 4)


def unpack_int4(packed_NP: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 (N, K) holding 0..15."""
    N, P = packed_NP.shape
    return torch.stack([packed_NP & 0xF, packed_NP >> 4], -1).view(N, 2 * P)


def dequantize_int4(
    packed_NP: torch.Tensor, scale_NG: torch.Tensor, zero_NG: torch.Tensor, group_size: int
) -> torch.Tensor:
    """fp32 W (N, K) = (q - 8) s + z, each (s, z) repeated over its group."""
    s_NK = scale_NG.float().repeat_interleave(group_size, 1)
    z_NK = zero_NG.float().repeat_interleave(group_size, 1)
    return (unpack_int4(packed_NP).float() - 8) * s_NK + z_NK


def w4a16_matmul_reference(
    x_MK: torch.Tensor, packed_NP: torch.Tensor, scale_NG: torch.Tensor, zero_NG: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Plain torch: dequantize the whole weight to fp32, matmul in fp32, cast to x's dtype."""
    w_NK = dequantize_int4(packed_NP, scale_NG, zero_NG, group_size)
    return (x_MK.float() @ w_NK.T).to(x_MK.dtype)


@jit
def _w4a16_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_pn,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_ym,
    stride_yn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m, in_n = rows_m < M, rows_n < N
    cols_c = tl.arange(0, GROUP_SIZE)
    bytes_c = tl.arange(0, GROUP_SIZE // 2)
    acc_MN = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP_SIZE):
        k0 = g * GROUP_SIZE
        x_MC = tl.load(
            x_ptr + rows_m[:, None] * stride_xm + (k0 + cols_c)[None, :] * stride_xk, mask=in_m[:, None], other=0.0
        )
        packed = tl.load(
            packed_ptr + rows_n[:, None] * stride_pn + (k0 // 2 + bytes_c)[None, :], mask=in_n[:, None], other=0
        )
        # (N, C/2) bytes -> (N, C/2, 2) nibbles -> (N, C): byte p's low nibble is input 2p, its high one 2p + 1
        q_NC = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, GROUP_SIZE))
        s_N = tl.load(scale_ptr + rows_n * stride_sn + g * stride_sg, mask=in_n, other=0.0)
        z_N = tl.load(zero_ptr + rows_n * stride_zn + g * stride_zg, mask=in_n, other=0.0)
        w_NC = q_NC.to(tl.float32) * s_N[:, None] + (z_N - 8.0 * s_N)[:, None]
        acc_MN = tl.dot(x_MC, tl.trans(w_NC.to(x_ptr.dtype.element_ty)), acc_MN)
    y_ptrs = y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :] * stride_yn
    tl.store(y_ptrs, acc_MN.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def w4a16_matmul_triton(
    x_MK: torch.Tensor,
    packed_NP: torch.Tensor,
    scale_NG: torch.Tensor,
    zero_NG: torch.Tensor,
    group_size: int,
    block_m: int = 16,
    block_n: int = 64,
) -> torch.Tensor:
    """The Triton kernel; group_size must be a power of two >= 16 (a tl.arange and tl.dot tile width)."""
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"the W4A16 kernel needs a power-of-two group size >= 16, not {group_size}")
    M, K = x_MK.shape
    N, P = packed_NP.shape
    assert packed_NP.dtype == torch.uint8 and packed_NP.stride(1) == 1 and K == 2 * P
    assert scale_NG.shape == zero_NG.shape == (N, K // group_size)
    y_MN = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _w4a16_kernel[grid](
        x_MK,
        packed_NP,
        scale_NG,
        zero_NG,
        y_MN,
        M,
        N,
        K,
        *x_MK.stride(),
        packed_NP.stride(0),
        *scale_NG.stride(),
        *zero_NG.stride(),
        *y_MN.stride(),
        GROUP_SIZE=group_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return y_MN


def w4a16_matmul(
    x_MK: torch.Tensor, packed_NP: torch.Tensor, scale_NG: torch.Tensor, zero_NG: torch.Tensor, group_size: int
) -> torch.Tensor:
    """y (M, N) in x's dtype: the Triton kernel on CUDA (or FRUGAL_FORCE_TRITON=1), else the torch reference."""
    if x_MK.shape[1] != 2 * packed_NP.shape[1] or x_MK.shape[1] % group_size:
        raise ValueError(
            f"x has {x_MK.shape[1]} inputs; the weight has {2 * packed_NP.shape[1]} in groups of {group_size}"
        )
    if use_triton(x_MK):
        return w4a16_matmul_triton(x_MK, packed_NP, scale_NG, zero_NG, group_size)
    return w4a16_matmul_reference(x_MK, packed_NP, scale_NG, zero_NG, group_size)
