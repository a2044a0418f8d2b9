"""Plain-torch reference for decode/append attention with sinks over a paged KV cache.

The rollout engine keeps each sequence's keys and values in fixed-size pages: ``k_cache[page, slot, kv_head, :]``,
with ``page_table[b, i]`` the page holding positions ``i * page_size .. (i + 1) * page_size - 1`` of sequence b.
The new tokens (one per sequence when decoding, a few for an append or speculative step, a whole prompt chunk for a
prefill) are ALREADY written to the cache, so sequence b's cache holds ``seq_lens[b]`` tokens and its
``n_b = cu_q_lens[b+1] - cu_q_lens[b]`` queries sit at positions ``seq_lens[b] - n_b .. seq_lens[b] - 1``.
Query at position p sees cached positions j <= p (and j > p - window). Same math as ``sink_attention_ref``.

``paged_decode_attention`` (the entry point) runs the Triton kernel of ``decode_triton`` on CUDA and the reference
below elsewhere; Triton is imported only when needed, so CPU-only installs work without it.
"""

from __future__ import annotations

import contextvars
import importlib.util

import torch

from ossrl.kernels.attention_ref import attend_with_sink, visible_keys

DEFAULT_KV_CHUNK = 256

# Set while a caller that checked its own values (``check_values=False``) is inside ``paged_decode_attention``.
_VALUES_CHECKED = contextvars.ContextVar("paged_decode_values_checked", default=False)


def check_paged_decode_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    max_q_len: int,
    sinks: torch.Tensor,
    window: int | None,
    kv_chunk: int,
) -> None:
    """Raise a clear ValueError on bad input. Checks that read tensor values (they synchronize with the GPU) are
    skipped while a CUDA graph is being captured (capture after one eager call has validated the same layout) and
    inside ``paged_decode_attention(..., check_values=False)``."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [N, Hq, D] and k_cache [pages, page_size, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}")  # fmt: skip
    n, hq, d = q.shape
    num_pages, page_size, hkv, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d:
        raise ValueError(f"k_cache and v_cache must both be [pages, page_size, Hkv, D={d}]; got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")  # fmt: skip
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of q heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k_cache, v_cache must share one floating dtype; got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")  # fmt: skip
    if sinks.shape != (hq,) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a floating [Hq={hq}] tensor; got {sinks.dtype} {tuple(sinks.shape)}")
    if page_table.dim() != 2 or page_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"page_table must be int32 [B, max_pages]; got {page_table.dtype} {tuple(page_table.shape)}")
    batch = page_table.shape[0]
    if seq_lens.shape != (batch,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be int32 [B={batch}]; got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if cu_q_lens.shape != (batch + 1,) or cu_q_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_q_lens must be int32 [B+1={batch + 1}]; got {cu_q_lens.dtype} {tuple(cu_q_lens.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1; got {window}")
    if kv_chunk < 16 or kv_chunk & (kv_chunk - 1):
        raise ValueError(f"kv_chunk must be a power of two >= 16; got {kv_chunk}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("sinks", sinks), ("page_table", page_table),
                    ("seq_lens", seq_lens), ("cu_q_lens", cu_q_lens)):  # fmt: skip
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if _VALUES_CHECKED.get() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    cu = cu_q_lens.tolist()
    if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_q_lens must start at 0, be non-decreasing and end at N={n}; got {cu}")
    q_lens = [b - a for a, b in zip(cu, cu[1:], strict=False)]
    if batch and max(q_lens) > max_q_len:
        raise ValueError(f"max_q_len ({max_q_len}) is smaller than the most new tokens of one sequence ({max(q_lens)})")
    lens = seq_lens.tolist()
    capacity = page_table.shape[1] * page_size
    for b, (length, nq) in enumerate(zip(lens, q_lens, strict=True)):
        if not nq <= length <= capacity:
            raise ValueError(f"sequence {b}: seq_lens ({length}) must count its {nq} new tokens and fit its "
                             f"{page_table.shape[1]} pages of {page_size} ({capacity})")  # fmt: skip
        used = page_table[b, : -(-length // page_size)] if nq else page_table[b, :0]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
            raise ValueError(f"sequence {b}: page ids must be in [0, {num_pages}); got {used.tolist()}")


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


SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    once per layer. Shapes, dtypes and devices are still checked.
    """
    if not check_values:
        token = _VALUES_CHECKED.set(True)
        try:
            return paged_decode_attention(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, max_q_len, sinks,
                                          window, softmax_scale, kv_chunk)  # fmt: skip
        finally:
            _VALUES_CHECKED.reset(token)
    args = (q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, max_q_len, sinks, window, softmax_scale, kv_chunk)
    if q.is_cuda:
        problem = triton_decode_problem(q.dtype, q.shape[-1])
        if problem is None:
            try:
                from ossrl.kernels.decode_triton import paged_decode_attention_triton
            except ImportError as err:  # installed but broken
                problem = f"Triton unavailable ({err})"
            else:
                return paged_decode_attention_triton(*args)
        from ossrl.kernels import warn_once  # lazy: ossrl.kernels imports this module

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
