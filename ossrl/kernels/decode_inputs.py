"""What paged decode attention takes: the head sizes and dtypes its Triton kernel supports, the default KV chunk, and
the input checks. Shared by the reference and entry point (``decode_ref``) and the Triton kernel (``decode_triton``),
so neither imports the other's module for them.
"""

from __future__ import annotations

import contextvars

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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
