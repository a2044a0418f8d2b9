"""Triton decode/append attention with sinks over a paged KV cache (the rollout engine's attention).

Layout and semantics: see ``decode_ref`` (same signature, the CPU path and the test oracle).

Work split. Each sequence's keys are cut into chunks of a FIXED size (``kv_chunk`` positions, 256 by default; never
a fixed number of splits). One program computes, for one (sequence, KV head, chunk, block of new tokens), an
unnormalized partial softmax (running max, sum, weighted values) for all G = Hq/Hkv query heads of the KV head at
once, so each K/V page is read once per KV head. A second kernel merges a row's chunk partials in chunk order,
starting from the sink (m = sink, l = 1) as the training kernel does. The result for a sequence depends only on
that sequence and on ``kv_chunk``, never on the batch around it; it is deterministic run to run.

Where it differs from the training kernel (``sink_attention``) and why:
- summation order: training runs one online softmax over keys in blocks of its BLOCK_N from position 0; decode runs
  one per chunk and merges the chunks. Rounding therefore differs (fp32 accumulation: ~1e-6 relative before the
  output is cast, so bf16 outputs agree to within one bf16 ulp mostly, not bitwise). Bitwise equality would need
  decode to walk all keys serially in one program, which costs long-context decode its parallelism.
- rows: the G query heads (and up to BLOCK_R/G new tokens) of one KV head share one tile, and fully masked key
  blocks are bitwise neutral, so results do not depend on how many tokens are appended in the same call.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ossrl.kernels.common import triton_interpreting
from ossrl.kernels.decode_inputs import (
    DEFAULT_KV_CHUNK,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    check_paged_decode_inputs,
)

# Key tile (positions per gathered load), warps, pipeline stages of the partial kernel. (32, 4, 3) compiles without
# register spills on sm_90 at head dim 64; benchmarks/attention.py --sweep may overwrite it.
DECODE_CONFIG: tuple[int, int, int] = (32, 4, 3)


def _capturing(q: torch.Tensor) -> bool:
    """Inside CUDA graph capture no value may be read back: the grid is sized from the page table's capacity."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


@triton.jit(do_not_specialize=["num_slots", "window"])
def _decode_partial_kernel(
    Q, KC, VC, PageTable, SeqLens, CuQ, PartAcc, PartM, PartL,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_pb,
    num_kv_heads, num_slots, num_q_heads, qk_scale, window,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr, BLOCK_R: tl.constexpr,
    HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    t0 = tl.program_id(2) * TOKENS
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    q_start = tl.load(CuQ + b).to(tl.int32)
    nq = tl.load(CuQ + b + 1).to(tl.int32) - q_start
    if t0 >= nq:
        return
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    first_pos = seq_len - nq + t0
    last_pos = seq_len - nq + tl.minimum(t0 + TOKENS, nq) - 1
    if HAS_WINDOW:  # the grid covers only the chunks a window can reach, counted from the block's first one
        chunk = tl.maximum(first_pos - window + 1, 0) // CHUNK + tl.program_id(1)
    else:
        chunk = tl.program_id(1)
    k_lo = chunk * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, last_pos + 1)
    if HAS_WINDOW:
        k_lo = tl.maximum(k_lo, first_pos - window + 1)
    if k_lo >= k_hi:
        return

    # Row r is query head hk*GROUP + r % GROUP of new token t0 + r // GROUP.
    r = tl.arange(0, BLOCK_R)
    t = t0 + r // GROUP
    h = hk * GROUP + r % GROUP
    row_ok = (r < TOKENS * GROUP) & (t < nq)
    pos = seq_len - nq + t
    offs_d = tl.arange(0, HEAD_DIM)
    tok = (q_start + t).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)  # fmt: skip

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for n0 in range(k_lo // BLOCK_N * BLOCK_N, k_hi, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        kv_ok = kpos < k_hi
        page = tl.load(PageTable + b.to(tl.int64) * stride_pb + kpos // PAGE_SIZE, mask=kv_ok, other=0).to(tl.int64)
        slot = kpos % PAGE_SIZE
        kt = tl.load(KC + page[None, :] * stride_kp + slot[None, :] * stride_ks + hk * stride_kh + offs_d[:, None],
                     mask=kv_ok[None, :], other=0.0)  # fmt: skip
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        visible = (kpos[None, :] <= pos[:, None]) & kv_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (kpos[None, :] > pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + page[:, None] * stride_vp + slot[:, None] * stride_vs + hk * stride_vh + offs_d[None, :],
                    mask=kv_ok[:, None], other=0.0)  # fmt: skip
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # Slots are numbered from the row's first visible chunk, so a windowed layer keeps only ~W/CHUNK + 2 of them.
    if HAS_WINDOW:
        row_first = tl.maximum(pos - window + 1, 0) // CHUNK
    else:
        row_first = pos * 0
    slot_idx = chunk - row_first
    keep = row_ok & (chunk * CHUNK <= pos) & (slot_idx >= 0)
    base = (tok * num_q_heads + h) * num_slots + slot_idx
    tl.store(PartM + base, m_i, mask=keep)
    tl.store(PartL + base, l_i, mask=keep)
    tl.store(PartAcc + base[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=keep[:, None])


@triton.jit(do_not_specialize=["num_slots", "window"])
def _decode_combine_kernel(
    PartAcc, PartM, PartL, Sinks, Out, SeqLens, CuQ,
    stride_ot, stride_oh, num_slots, num_q_heads, window,
    HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CuQ + b).to(tl.int32)
    nq = tl.load(CuQ + b + 1).to(tl.int32) - q_start
    if t >= nq:
        return
    tok = q_start + t
    pos = tl.load(SeqLens + b).to(tl.int32) - nq + t
    if HAS_WINDOW:
        first = tl.maximum(pos - window + 1, 0) // CHUNK
    else:
        first = 0
    n_used = pos // CHUNK - first + 1
    offs_d = tl.arange(0, HEAD_DIM)
    base = (tok.to(tl.int64) * num_q_heads + h) * num_slots
    m_run = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634  # start from the sink, as in training
    l_run = m_run * 0.0 + 1.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, n_used, BLOCK_C):  # fixed chunk order: deterministic
        s = s0 + tl.arange(0, BLOCK_C)
        ok = s < n_used
        m_c = tl.load(PartM + base + s, mask=ok, other=float("-inf"))
        l_c = tl.load(PartL + base + s, mask=ok, other=0.0)
        a_c = tl.load(PartAcc + (base + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_c, 0))
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m_c - m_new)
        l_run = l_run * alpha + tl.sum(w * l_c, 0)
        acc = acc * alpha + tl.sum(w[:, None] * a_c, 0)
        m_run = m_new
    out = acc / l_run
    tl.store(Out + tok.to(tl.int64) * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    max_q_len: int,
    sinks: torch.Tensor,
    window: int | None = None,
    softmax_scale: float | None = None,
    kv_chunk: int = DEFAULT_KV_CHUNK,
) -> torch.Tensor:
    """Triton version of ``paged_decode_attention_ref`` (same arguments, same math; see the module docstring)."""
    check_paged_decode_inputs(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, max_q_len, sinks, window, kv_chunk)
    n, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    if d not in SUPPORTED_HEAD_DIMS or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"paged_decode_attention_triton supports head dims {SUPPORTED_HEAD_DIMS} and dtypes "
                         f"{SUPPORTED_DTYPES}; got {d}, {q.dtype}")  # fmt: skip
    if not triton_interpreting() and not q.is_cuda:
        raise ValueError(f"paged_decode_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1); got {q.device}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in the head dim")
    out = torch.empty(n, hq, d, device=q.device, dtype=q.dtype)
    batch = page_table.shape[0]
    if n == 0 or batch == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    page_table = page_table.contiguous()
    group = hq // hkv
    block_n, warps, stages = (16, 4, 1) if triton_interpreting() else DECODE_CONFIG
    block_n = min(block_n, kv_chunk)
    block_r = max(16, triton.next_power_of_2(group))
    tokens = block_r // group
    # Chunks to launch: from the longest sequence when we may read it, else from the page table's capacity.
    max_len = page_table.shape[1] * page_size if _capturing(q) else int(seq_lens.max())
    num_chunks = max(1, triton.cdiv(max_len, kv_chunk))
    num_slots = num_chunks if window is None else min(num_chunks, (window - 1) // kv_chunk + 2)
    part_acc = torch.empty(n, hq, num_slots, d, device=q.device, dtype=torch.float32)
    part_m = torch.empty(n, hq, num_slots, device=q.device, dtype=torch.float32)
    part_l = torch.empty(n, hq, num_slots, device=q.device, dtype=torch.float32)
    # Windowed: a block of `tokens` rows reaches at most this many chunks, so empty programs are never launched.
    reach = num_chunks if window is None else min(num_chunks, (window + tokens - 2) // kv_chunk + 2)
    grid = (batch * hkv, reach, triton.cdiv(max_q_len, tokens))
    _decode_partial_kernel[grid](
        q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, part_acc, part_m, part_l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0),
        hkv, num_slots, hq, (d**-0.5 if softmax_scale is None else softmax_scale) * math.log2(math.e), window or 0,
        PAGE_SIZE=page_size, GROUP=group, TOKENS=tokens, BLOCK_R=block_r, HEAD_DIM=d, CHUNK=kv_chunk,
        BLOCK_N=block_n, HAS_WINDOW=window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _decode_combine_kernel[(max_q_len, batch, hq)](
        part_acc, part_m, part_l, sinks, out, seq_lens, cu_q_lens,
        out.stride(0), out.stride(1), num_slots, hq, window or 0,
        HEAD_DIM=d, CHUNK=kv_chunk, BLOCK_C=16, HAS_WINDOW=window is not None, num_warps=1,
    )  # fmt: skip
    return out
