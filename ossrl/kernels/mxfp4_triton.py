"""Triton grouped GEMMs over MXFP4 expert weights, dequantizing in registers: the forward and its input gradient.

``mxfp4_grouped_matmul_triton(x, blocks, scales, counts)`` computes what ``mxfp4_grouped_matmul_ref`` computes: rows
of ``x`` [R, K] sorted by expert, group e (``counts[e]`` rows) times expert e's weight W_e^T [K, N], where W_e is
stored as MXFP4 ``blocks`` [E, N, K/32, 16] (two E2M1 codes per byte, low nibble first) and ``scales`` [E, N, K/32]
(E8M0). Each weight byte is read once per block of rows and never written back dequantized: the dequantized copy
the reference makes (2 bytes a value written, then read by the GEMM, against 0.53 read here) is what this saves.

One program per (expert, block of N outputs) walks its expert's rows in blocks of BLOCK_M (group offsets are read on
the device, so the launch needs no host value and a CUDA graph can capture it), and for each K block unpacks the
codes, scales them by their block's power of two (built from the bits, as the reference does: the dequantized
values are bitwise the reference's) and accumulates with ``tl.dot`` in fp32.

``mxfp4_grouped_matmul_dx_triton(grad, blocks, scales, counts)`` is the backward for the input (the weights are
frozen: no weight gradient): dX_e = dY_e @ W_e, [rows, K]. The scales run along K, the dimension dX keeps, so one
program owns (expert, block of K) and reduces over N: each step reads a [BLOCK_N, BLOCK_K] weight tile (rows n,
contiguous bytes along k, the forward's tile) and multiplies dY's [BLOCK_M, BLOCK_N] by it, untransposed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ossrl.kernels.common import triton_interpreting
from ossrl.kernels.mxfp4_format import check_mxfp4_grouped_dx_inputs, check_mxfp4_grouped_inputs

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); BLOCK_K is a multiple of the 32-value MXFP4 block.
MXFP4_CONFIG: tuple[int, int, int, int, int] = (16, 64, 64, 4, 3)
# Under TRITON_INTERPRET=1 (the CPU tests): small tiles, so small shapes still span several of them.
INTERPRET_CONFIG: tuple[int, int, int, int, int] = (16, 16, 32, 1, 1)


@triton.jit
def _e2m1(code):
    """E2M1 codes (int32 0..15) -> fp32 values, from the bits: sign bit 3, exponent bits 2-1, mantissa bit 0."""
    sign = code >> 3
    exponent = (code >> 1) & 3
    mantissa = code & 1
    bits = tl.where(exponent == 0, mantissa * (126 << 23), ((exponent + 126) << 23) | (mantissa << 22))
    return (bits | (sign << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _dequantize_tile(packed, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] fp32 tile of W from its packed bytes [BLOCK_N, BLOCK_K / 2] and E8M0 scales
    [BLOCK_N, BLOCK_K / 32], both int32: what both kernels multiply by, dequantized in registers."""
    w = tl.reshape(tl.join(_e2m1(packed & 15), _e2m1(packed >> 4)), [BLOCK_N, BLOCK_K])  # low nibble first
    scale = tl.where(s > 0, s << 23, 1 << 22).to(tl.float32, bitcast=True)  # 2**(s - 127), exactly
    return tl.reshape(tl.reshape(w, [BLOCK_N, BLOCK_K // 32, 32]) * scale[:, :, None], [BLOCK_N, BLOCK_K])


@triton.jit
def _mxfp4_grouped_kernel(
    X, Blocks, Scales, Offsets, Out, K, N,
    stride_xm, stride_be, stride_bn, stride_se, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0)
    start = tl.load(Offsets + e)
    end = tl.load(Offsets + e + 1)
    if start == end:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    blocks = Blocks + e.to(tl.int64) * stride_be + offs_n[:, None].to(tl.int64) * stride_bn
    scales = Scales + e.to(tl.int64) * stride_se + offs_n[:, None].to(tl.int64) * stride_sn
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)  # fmt: skip
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(blocks + offs_b[None, :], mask=n_ok[:, None] & (offs_b < K // 2)[None, :], other=0)
            offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            s = tl.load(scales + offs_g[None, :], mask=n_ok[:, None] & (offs_g < K // 32)[None, :], other=127)
            w = _dequantize_tile(packed.to(tl.int32), s.to(tl.int32), BLOCK_N, BLOCK_K)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
        tl.store(Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


@triton.jit
def _mxfp4_grouped_dx_kernel(
    G, Blocks, Scales, Offsets, Out, K, N,
    stride_gm, stride_be, stride_bn, stride_se, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0)
    start = tl.load(Offsets + e)
    end = tl.load(Offsets + e + 1)
    if start == end:
        return
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    b_ok = offs_b < K // 2
    offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    g_ok = offs_g < K // 32
    blocks = Blocks + e.to(tl.int64) * stride_be + offs_b[None, :]
    scales = Scales + e.to(tl.int64) * stride_se + offs_g[None, :]
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            g = tl.load(G + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :],
                        mask=m_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
            rows = offs_n[:, None].to(tl.int64)
            packed = tl.load(blocks + rows * stride_bn, mask=n_ok[:, None] & b_ok[None, :], other=0).to(tl.int32)
            s = tl.load(scales + rows * stride_sn, mask=n_ok[:, None] & g_ok[None, :], other=127).to(tl.int32)
            w = _dequantize_tile(packed, s, BLOCK_N, BLOCK_K)
            acc = tl.dot(g, w.to(g.dtype), acc, input_precision=PRECISION)
        tl.store(Out + offs_m[:, None].to(tl.int64) * stride_om + offs_k[None, :], acc.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])  # fmt: skip


def _offsets(counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E+1] int32 row offsets of the groups, computed on the device (no host read)."""
    offsets = torch.zeros(num_experts + 1, device=counts.device, dtype=torch.int32)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def _check_device(x: torch.Tensor, name: str) -> None:
    if not triton_interpreting() and not x.is_cuda:
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1); got {x.device}")


def mxfp4_grouped_matmul_triton(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Triton version of ``mxfp4_grouped_matmul_ref`` (same arguments, same result up to summation order)."""
    check_mxfp4_grouped_inputs(x, blocks, scales, counts)
    _check_device(x, "mxfp4_grouped_matmul_triton")
    num_experts, n, groups, _ = blocks.shape
    k = groups * 32
    x = x if x.stride(-1) == 1 else x.contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    if x.shape[0] == 0 or n == 0:
        return out
    offsets = _offsets(counts, num_experts)
    block_m, block_n, block_k, warps, stages = INTERPRET_CONFIG if triton_interpreting() else MXFP4_CONFIG
    grid = (num_experts, triton.cdiv(n, block_n))
    _mxfp4_grouped_kernel[grid](
        x, blocks, scales, offsets, out, k, n,
        x.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the dX kernel: BLOCK_K (dX's columns) a multiple of 32, BLOCK_N the
# reduction step. Untuned: chosen like the forward's, to be measured (benchmarks/mxfp4_backward.py).
MXFP4_DX_CONFIG: tuple[int, int, int, int, int] = (16, 64, 64, 4, 3)


def mxfp4_grouped_matmul_dx_triton(
    grad: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Triton version of ``mxfp4_grouped_matmul_dx_ref``: grad [R, N] (dY, rows sorted by expert) -> dX [R, K] in
    grad's dtype, dX_e = dY_e @ W_e, the weight dequantized tile by tile in registers."""
    num_experts, n, groups, _ = blocks.shape
    k = groups * 32
    check_mxfp4_grouped_dx_inputs(grad, blocks, scales, counts)
    _check_device(grad, "mxfp4_grouped_matmul_dx_triton")
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty(grad.shape[0], k, device=grad.device, dtype=grad.dtype)
    if grad.shape[0] == 0 or k == 0:
        return out
    if n == 0:
        return out.zero_()
    offsets = _offsets(counts, num_experts)
    block_m, block_n, block_k, warps, stages = INTERPRET_CONFIG if triton_interpreting() else MXFP4_DX_CONFIG
    grid = (num_experts, triton.cdiv(k, block_k))
    _mxfp4_grouped_dx_kernel[grid](
        grad, blocks, scales, offsets, out, k, n,
        grad.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if grad.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
