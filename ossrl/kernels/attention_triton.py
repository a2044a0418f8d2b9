"""Triton kernels for causal attention with sinks over packed variable-length batches (training: fwd + bwd).

FlashAttention-2 structure. Forward: one program per (query block, q head, sequence) runs a blocked online
softmax in base 2 whose running max and sum START at the sink (m = sink, l = 1), so the saved log-sum-exp already
includes the sink and the sink needs no special case anywhere else. Backward, three launches:
  1. preprocess: delta_i = rowsum(dO_i * O_i), and per (q head, query block) a partial of
     dsink_h = -sum_i exp(sink_h - L_i) * delta_i; the partials are summed in a fixed order by torch (no atomics,
     so dsink is bitwise reproducible).
  2. dK/dV: one program per (key block, KV head, sequence) loops over the KV head's G query heads and over the
     query blocks that see its keys, accumulating dK/dV in registers: GQA without repeating K/V and without atomics.
  3. dQ: one program per (query block, q head, sequence), the forward's loop again.
Only blocks that hold at least one visible (query, key) pair are visited, so a sliding window costs O(T * W). Blocks
entirely inside the visible region skip the mask arithmetic. Math: see ``attention_ref``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ossrl.kernels.attention_ref import check_sink_attention_inputs
from ossrl.kernels.common import planned_gpu, planning, triton_interpreting

LOG2E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttnConfig:
    """Tile sizes and launch settings of the three main kernels (fwd, bwd dK/dV, bwd dQ). The defaults were the
    fastest of a sweep at head dim 64, T=16k causal, bf16 on an H100 with Triton 3.6 (benchmarks/attention.py)."""

    fwd_m: int = 128
    fwd_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dkv_m: int = 32
    dkv_n: int = 128
    dkv_warps: int = 4
    dkv_stages: int = 3
    dq_m: int = 128
    dq_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 4


# Small, deliberately unequal tiles under the interpreter: cheap on CPU and they exercise the block-boundary logic.
INTERPRET_CONFIG = AttnConfig(fwd_m=32, fwd_n=16, dkv_m=16, dkv_n=32, dq_m=32, dq_n=16)
# Per head dim, for GPUs. Benchmarks may overwrite entries (see benchmarks/attention.py --sweep).
GPU_CONFIGS: dict[int, AttnConfig] = {
    16: AttnConfig(),
    32: AttnConfig(),
    64: AttnConfig(),
    128: AttnConfig(dkv_m=64, dkv_n=32, dkv_warps=8, dq_m=64, dq_n=32, dq_stages=3),  # spill-free on sm_90
}


def kernel_config(head_dim: int) -> AttnConfig:
    return INTERPRET_CONFIG if triton_interpreting() else GPU_CONFIGS[head_dim]


@triton.jit
def _ceil_to(x, block: tl.constexpr):
    return (x + block - 1) // block * block


# ---------------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, seq_len, start, end, qk_scale, window,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < seq_len
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = offs_n[None, :] <= offs_m[:, None]
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] - window)
            qk = tl.where(visible, qk, float("-inf"))
        # m_i starts at the (finite) sink, so it is never -inf and rows masked in this block stay NaN-free.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_ranges(m0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key-block bounds for query block [m0, m0+BLOCK_M): masked [lo, a), unmasked [a, b), masked [b, hi)."""
    hi = tl.minimum(m0 + BLOCK_M, seq_len)
    full_hi = (m0 + 1) // BLOCK_N * BLOCK_N  # key blocks ending at or before m0+1 are causally visible to all rows
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = _ceil_to(tl.maximum(m0 + BLOCK_M - window, 0), BLOCK_N)  # ... and from here inside every window
    else:
        lo = 0
        full_lo = 0
    b = tl.maximum(full_hi, lo)
    a = tl.minimum(tl.maximum(full_lo, lo), b)
    return lo, a, b, hi


@triton.jit(do_not_specialize=["total_tokens", "window", "GROUP"])
def _fwd_kernel(
    Q, K, V, Sinks, Out, Lse, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_tokens, qk_scale, window, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # Causal: later query blocks have more work, so launch them first (better tail balance).
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CuSeqlens + seq).to(tl.int32)
    seq_len = tl.load(CuSeqlens + seq + 1).to(tl.int32) - seq_start
    m0 = m_block * BLOCK_M
    if m0 >= seq_len:
        return
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    tok = (seq_start + offs_m).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + seq_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + seq_start.to(tl.int64) * stride_vt + hk * stride_vh

    sink = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, a, b, hi = _key_ranges(m0, seq_len, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, seq_len,
                                lo, a, qk_scale, window, BLOCK_N, True, HAS_WINDOW, PRECISION)  # fmt: skip
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, seq_len,
                                a, b, qk_scale, window, BLOCK_N, False, HAS_WINDOW, PRECISION)  # fmt: skip
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, seq_len,
                                b, hi, qk_scale, window, BLOCK_N, True, HAS_WINDOW, PRECISION)  # fmt: skip

    out = acc / l_i[:, None]
    tl.store(Out + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip
    tl.store(Lse + h * total_tokens + tok, m_i + tl.log2(l_i), mask=row_ok)  # base-2 LSE, sink included


# ---------------------------------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["total_tokens"])
def _bwd_preprocess(
    Out, DOut, Lse, Sinks, Delta, DsinkPart, CuSeqlens,
    stride_ot, stride_oh, stride_dt, stride_dh, total_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    m_block = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CuSeqlens + seq).to(tl.int32)
    seq_len = tl.load(CuSeqlens + seq + 1).to(tl.int32) - seq_start
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    tok = (seq_start + offs_m).to(tl.int64)
    o = tl.load(Out + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DOut + tok[:, None] * stride_dt + h * stride_dh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h * total_tokens + tok, delta, mask=row_ok)
    lse = tl.load(Lse + h * total_tokens + tok, mask=row_ok, other=float("inf"))
    sink = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
    part = tl.sum(tl.where(row_ok, tl.exp2(sink - lse) * delta, 0.0), 0)
    # Every program writes its slot (0 when past the sequence's end), so the buffer needs no zeroing.
    tl.store(DsinkPart + h * (tl.num_programs(0) * tl.num_programs(2)) + seq * tl.num_programs(0) + m_block, -part)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dt, offs_n, offs_d, seq_len,
    start, end, qk_scale, window,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        # Rows past the sequence get LSE = +inf, hence P = 0: they contribute nothing without a mask.
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        pt = tl.exp2(tl.dot(k, qt, input_precision=PRECISION) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
        if MASKED:
            visible = offs_m[None, :] >= offs_n[:, None]
            if HAS_WINDOW:
                visible = visible & (offs_m[None, :] < offs_n[:, None] + window)
            pt = tl.where(visible, pt, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["total_tokens", "window", "GROUP"])
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_tokens, qk_scale, sm_scale, window, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    n_block = tl.program_id(0)  # key block 0 sees every query: heaviest first, in launch order already
    hk = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CuSeqlens + seq).to(tl.int32)
    seq_len = tl.load(CuSeqlens + seq + 1).to(tl.int32) - seq_start
    n0 = n_block * BLOCK_N
    if n0 >= seq_len:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_len
    tok = (seq_start + offs_n).to(tl.int64)
    k = tl.load(K + tok[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + tok[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query blocks that see this key block: masked [lo, a), unmasked [a, b), masked [b, hi).
    lo = n0 // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(seq_len, n0 + BLOCK_N - 1 + window)
        b = (n0 + window) // BLOCK_M * BLOCK_M  # blocks ending by n0 + window are inside every key's window
    else:
        hi = seq_len
        b = hi
    a = tl.minimum(tl.maximum(_ceil_to(n0 + BLOCK_N - 1, BLOCK_M), lo), hi)  # first block past the diagonal
    b = tl.minimum(tl.maximum(b, a), hi)

    row0 = seq_start.to(tl.int64)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + row0 * stride_qt + h * stride_qh
        do_base = DOut + row0 * stride_dt + h * stride_dh
        lse_base = Lse + h * total_tokens + row0
        delta_base = Delta + h * total_tokens + row0
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dt,
                              offs_n, offs_d, seq_len, lo, a, qk_scale, window,
                              BLOCK_M, True, HAS_WINDOW, PRECISION)  # fmt: skip
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dt,
                              offs_n, offs_d, seq_len, a, b, qk_scale, window,
                              BLOCK_M, False, HAS_WINDOW, PRECISION)  # fmt: skip
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dt,
                              offs_n, offs_d, seq_len, b, hi, qk_scale, window,
                              BLOCK_M, True, HAS_WINDOW, PRECISION)  # fmt: skip

    dk = dk * sm_scale
    tl.store(DK + tok[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None])  # fmt: skip
    tl.store(DV + tok[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])  # fmt: skip


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, seq_len, start, end, qk_scale,
    window, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < seq_len
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] <= offs_m[:, None]
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] - window)
            p = tl.where(visible, p, 0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["total_tokens", "window", "GROUP"])
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, CuSeqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh, stride_dqt, stride_dqh,
    total_tokens, qk_scale, sm_scale, window, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CuSeqlens + seq).to(tl.int32)
    seq_len = tl.load(CuSeqlens + seq + 1).to(tl.int32) - seq_start
    m0 = m_block * BLOCK_M
    if m0 >= seq_len:
        return
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    tok = (seq_start + offs_m).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DOut + tok[:, None] * stride_dt + h * stride_dh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + h * total_tokens + tok, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + h * total_tokens + tok, mask=row_ok, other=0.0)
    k_base = K + seq_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + seq_start.to(tl.int64) * stride_vt + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, a, b, hi = _key_ranges(m0, seq_len, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, seq_len,
                    lo, a, qk_scale, window, BLOCK_N, True, HAS_WINDOW, PRECISION)  # fmt: skip
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, seq_len,
                    a, b, qk_scale, window, BLOCK_N, False, HAS_WINDOW, PRECISION)  # fmt: skip
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, seq_len,
                    b, hi, qk_scale, window, BLOCK_N, True, HAS_WINDOW, PRECISION)  # fmt: skip
    dq = dq * sm_scale
    tl.store(DQ + tok[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip


# ---------------------------------------------------------------------------------------------------- host side


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (the default tf32 would cost ~3e-4 relative error); 16-bit ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window) -> None:
    """What the Triton kernel supports beyond ``check_sink_attention_inputs``; raise before launch."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"sink_attention_triton supports head dims {SUPPORTED_HEAD_DIMS}; got {d}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"sink_attention_triton supports {SUPPORTED_DTYPES}; got {q.dtype}")
    if window is not None and window >= 2**30:
        raise ValueError(f"window ({window}) too large; pass None for full causal attention")
    if not triton_interpreting() and not q.is_cuda and not planned_gpu(q.device):
        raise ValueError(f"sink_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1); got {q.device}")


_last_checked: list = [None, None]  # [weakref to the cu_seqlens last validated, key of everything else]


def _check_once(q, k, v, sinks, cu_seqlens, max_seqlen, window) -> None:
    """Validate, but read cu_seqlens (a GPU sync) only once per pack: a model calls attention once per layer with
    the same cu_seqlens tensor. A repeat is recognized by object identity and its version counter (bumped by any
    in-place change), together with every other argument's shape, dtype and device."""
    if planning():  # shape-only tensors (``ossrl.memory``): nothing to read
        return
    args = (q, k, v, sinks, cu_seqlens)
    # Inference-mode tensors have no version counter (and cannot be changed in place outside inference mode).
    version = None if cu_seqlens.is_inference() else cu_seqlens._version
    key = (version, max_seqlen, window, *((x.shape, x.dtype, x.device) for x in args))
    ref = _last_checked[0]
    if ref is not None and ref() is cu_seqlens and _last_checked[1] == key:
        return
    check_sink_attention_inputs(q, k, v, sinks, cu_seqlens, max_seqlen, window)
    check_kernel_inputs(q, k, v, sinks, window)
    _last_checked[:] = [weakref.ref(cu_seqlens), key]


def _forward(q, k, v, sinks, cu_seqlens, max_seqlen, window, sm_scale, cfg):
    t, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(hq, t, device=q.device, dtype=torch.float32)
    batch = cu_seqlens.numel() - 1
    grid = (triton.cdiv(max_seqlen, cfg.fwd_m), hq, batch)
    if not planning():  # planning: the same allocations, no launch
        _fwd_kernel[grid](
            q, k, v, sinks, out, lse, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            t, sm_scale * LOG2E, window or 0, hq // hkv,
            HEAD_DIM=d, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, HAS_WINDOW=window is not None,
            PRECISION=_precision(q.dtype), num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        )  # fmt: skip
    return out, lse


def _backward(dout, q, k, v, sinks, cu_seqlens, out, lse, max_seqlen, window, sm_scale, cfg):
    t, hq, d = q.shape
    hkv = k.shape[1]
    batch = cu_seqlens.numel() - 1
    dout = _last_dim_contiguous(dout)
    delta = torch.empty(hq, t, device=q.device, dtype=torch.float32)
    pre_block = 64
    pre_grid = (triton.cdiv(max_seqlen, pre_block), hq, batch)
    dsink_part = torch.empty(hq, pre_grid[0] * batch, device=q.device, dtype=torch.float32)
    if not planning():  # planning: the same allocations, no launch
        _bwd_preprocess[pre_grid](
            out, dout, lse, sinks, delta, dsink_part, cu_seqlens,
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), t, HEAD_DIM=d, BLOCK_M=pre_block,
        )  # fmt: skip
    dsink = dsink_part.sum(dim=1).to(sinks.dtype)  # fixed-order reduction: deterministic

    common = dict(GROUP=hq // hkv, HEAD_DIM=d, HAS_WINDOW=window is not None, PRECISION=_precision(q.dtype))
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if not planning():  # planning: the same allocations, no launch
        _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg.dkv_n), hkv, batch)](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            t, sm_scale * LOG2E, sm_scale, window or 0,
            BLOCK_M=cfg.dkv_m, BLOCK_N=cfg.dkv_n, num_warps=cfg.dkv_warps, num_stages=cfg.dkv_stages, **common,
        )  # fmt: skip
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if not planning():  # planning: the same allocations, no launch
        _bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg.dq_m), hq, batch)](
            q, k, v, dout, lse, delta, dq, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1),
            dq.stride(0), dq.stride(1),
            t, sm_scale * LOG2E, sm_scale, window or 0,
            BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, num_warps=cfg.dq_warps, num_stages=cfg.dq_stages, **common,
        )  # fmt: skip
    return dq, dk, dv, dsink


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_seqlens, max_seqlen, window, sm_scale):
        cfg = kernel_config(q.shape[-1])
        out, lse = _forward(q, k, v, sinks, cu_seqlens, max_seqlen, window, sm_scale, cfg)
        ctx.save_for_backward(q, k, v, sinks, cu_seqlens, out, lse)
        ctx.args = (max_seqlen, window, sm_scale, cfg)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, cu_seqlens, out, lse = ctx.saved_tensors
        dq, dk, dv, dsink = _backward(dout, q, k, v, sinks, cu_seqlens, out, lse, *ctx.args)
        return dq, dk, dv, dsink, None, None, None, None


def sink_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Triton attention with sinks; same signature and math as ``sink_attention_ref``. Differentiable in q, k, v
    and sinks. Inputs are checked (shapes, dtypes, cu_seqlens, head dim) before any launch."""
    _check_once(q, k, v, sinks, cu_seqlens, max_seqlen, window)
    sm_scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _SinkAttention.apply(q, k, v, sinks.contiguous(), cu_seqlens.contiguous(), int(max_seqlen), window, sm_scale)
