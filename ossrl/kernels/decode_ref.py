"""Plain-torch reference for decode/append attention with sinks over a paged KV cache.

The rollout engine keeps each sequence's keys and values in fixed-size pages: ``k_cache[page, slot, kv_head, :]``,
with ``page_table[b, i]`` the page holding positions ``i * page_size .. (i + 1) * page_size - 1`` of sequence b.
The new tokens (one per sequence when decoding, a few for an append or speculative step, a whole prompt chunk for a
prefill) are ALREADY written to the cache, so sequence b's cache holds ``seq_lens[b]`` tokens and its
``n_b = cu_q_lens[b+1] - cu_q_lens[b]`` queries sit at positions ``seq_lens[b] - n_b .. seq_lens[b] - 1``.
Query at position p sees cached positions j <= p (and j > p - window). Same math as ``sink_attention_ref``.

``paged_decode_attention`` (the entry point) runs the Triton kernel of ``decode_triton`` on CUDA and the reference
below elsewhere; Triton is imported only when needed, so CPU-only installs work without it. What the op takes
(supported dtypes and head sizes, input checks) is in ``decode_inputs``, which both this module and the kernel use.
"""

from __future__ import annotations

import importlib.util

import torch

from ossrl.kernels import batch_invariant
from ossrl.kernels.attention_ref import attend_with_sink, visible_keys
from ossrl.kernels.common import deterministic_enabled, warn_once
from ossrl.kernels.decode_inputs import (
    _VALUES_CHECKED,
    DEFAULT_KV_CHUNK,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    check_paged_decode_inputs,
)


def paged_decode_attention_ref(
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
    """Reference decode attention: q [N, Hq, D] (new tokens of all sequences, packed by ``cu_q_lens``),
    k_cache/v_cache [pages, page_size, Hkv, D], page_table int32 [B, max_pages], seq_lens int32 [B] (cached tokens,
    new ones included), cu_q_lens int32 [B+1], sinks [Hq]. Returns [N, Hq, D] in q's dtype; fp32 math.
    ``kv_chunk`` only shapes the Triton kernel's work split; the math does not depend on it."""
    check_paged_decode_inputs(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, max_q_len, sinks, window, kv_chunk)
    n, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    group = hq // hkv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    sink = sinks.float().view(hkv, group, 1, 1)
    out = q.new_zeros(n, hq, d)
    cu, lens = cu_q_lens.tolist(), seq_lens.tolist()
    for b, length in enumerate(lens):
        q0, q1 = cu[b], cu[b + 1]
        if q1 == q0:
            continue
        pages = page_table[b, : -(-length // page_size)].long()
        kb = k_cache[pages].reshape(-1, hkv, d)[:length].float().transpose(0, 1).unsqueeze(1)  # [Hkv, 1, L, D]
        vb = v_cache[pages].reshape(-1, hkv, d)[:length].float().transpose(0, 1).unsqueeze(1)
        qb = q[q0:q1].float().transpose(0, 1).reshape(hkv, group, q1 - q0, d)
        qpos = torch.arange(length - (q1 - q0), length, device=q.device).view(-1, 1)
        kpos = torch.arange(length, device=q.device).view(1, -1)
        ob = attend_with_sink(qb, kb, vb, visible_keys(qpos, kpos, window), sink, scale)  # same math as training
        out[q0:q1] = ob.reshape(hq, q1 - q0, d).transpose(0, 1).to(q.dtype)
    return out


def paged_decode_attention(
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
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Decode/append attention with sinks over a paged KV cache: the Triton kernel on CUDA, the reference elsewhere.

    q [N, Hq, D] new tokens packed by cu_q_lens int32 [B+1] (already written to the cache), k_cache/v_cache
    [pages, page_size, Hkv, D], page_table int32 [B, max_pages], seq_lens int32 [B] (cached tokens incl. new ones),
    sinks [Hq]. Returns [N, Hq, D]. Not differentiable (inference only).
    ``check_values=False`` skips the checks that read cu_q_lens, seq_lens and page_table (on CUDA each read waits
    for the GPU): for a caller that built them itself and checked them once, e.g. once per decode step rather than
    once per layer. Shapes, dtypes and devices are still checked. In deterministic mode (``ossrl.deterministic()``)
    ``batch_invariant.paged_decode_attention`` runs: the training path's reduction, one query at a time.
    """
    if not check_values:
        token = _VALUES_CHECKED.set(True)
        try:
            return paged_decode_attention(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, max_q_len, sinks,
                                          window, softmax_scale, kv_chunk)  # fmt: skip
        finally:
            _VALUES_CHECKED.reset(token)
    args = (q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, max_q_len, sinks, window, softmax_scale, kv_chunk)
    if deterministic_enabled():  # the training path's per-query reduction (reads lengths on the host)
        return batch_invariant.paged_decode_attention(*args)
    if q.is_cuda:
        problem = triton_decode_problem(q.dtype, q.shape[-1])
        if problem is None:
            try:
                from ossrl.kernels.decode_triton import paged_decode_attention_triton
            except ImportError as err:  # installed but broken
                problem = f"Triton unavailable ({err})"
            else:
                return paged_decode_attention_triton(*args)
        warn_once("paged_decode_attention", f"paged_decode_attention: {problem}; using the plain-torch reference "
                  "(slow)")  # fmt: skip
    return paged_decode_attention_ref(*args)


def triton_decode_problem(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why CUDA tensors of ``dtype`` and ``head_dim`` would not get the Triton kernel (None: they would). The
    reference reads lengths on the host, so a caller capturing CUDA graphs asks first."""
    if head_dim not in SUPPORTED_HEAD_DIMS or dtype not in SUPPORTED_DTYPES:
        return f"no Triton kernel for {dtype}, head dim {head_dim}"
    if importlib.util.find_spec("triton") is None:  # not imported here: importing fixes Triton's interpreter mode
        return "Triton is not installed"
    return None
