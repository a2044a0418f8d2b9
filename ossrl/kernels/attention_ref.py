"""Plain-torch reference for attention with sinks over packed variable-length batches.

This is the CPU path and the oracle the Triton kernels are tested against. It works one sequence at a time
and, inside a sequence, one block of queries at a time against only the keys that block can see, so memory is
O(block * visible keys) rather than O(T^2) for the whole pack.

Math (GPT-OSS): for query i of head h, with s_ij = scale * q_i . k_j over the visible keys j,
    P_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sink_h)),   out_i = sum_j P_ij v_j.
The sink only adds mass to the denominator; it has no value vector. Visible keys: j <= i (causal) and, with
``window=W``, j >= i - W + 1 (W keys including the query itself).
"""

from __future__ import annotations

import torch

QUERY_BLOCK = 256
PADDED_SCORES_LIMIT = 2**24  # B * Hq * L * L scores: above this, one sequence at a time


def check_sink_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int | None,
) -> None:
    """Raise a clear ValueError for inputs that would otherwise give a silent wrong answer."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k and v must be [T={t}, Hkv, D={d}]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of q heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if sinks.shape != (hq,):
        raise ValueError(f"sinks must be [Hq={hq}]; got {tuple(sinks.shape)}")
    if not sinks.is_floating_point():
        raise ValueError(f"sinks must be floating point (fp32 recommended); got {sinks.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor [B+1]; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must be non-decreasing; got {cu}")
    if cu[-1] != t:
        raise ValueError(f"cu_seqlens[-1] ({cu[-1]}) must equal the number of tokens T ({t})")
    longest = max(b - a for a, b in zip(cu, cu[1:], strict=False))
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({longest})")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1; got {window}")
    for name, x in (("k", k), ("v", v), ("sinks", sinks), ("cu_seqlens", cu_seqlens)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")


def sink_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Reference attention with sinks. q [T, Hq, D], k/v [T, Hkv, D], sinks [Hq], cu_seqlens int [B+1].

    Returns out [T, Hq, D] in q's dtype; all softmax math is fp32. Differentiable in q, k, v and sinks.
    """
    check_sink_attention_inputs(q, k, v, sinks, cu_seqlens, max_seqlen, window)
    t, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    sink = sinks.float().view(hkv, group, 1, 1)
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    longest = max(lengths, default=0)
    if longest and len(lengths) * hq * longest * longest <= PADDED_SCORES_LIMIT:
        return _padded_sink_attention(q, k, v, sink, bounds, longest, window, scale)
    out = q.new_empty(t, hq, d)
    for start, end in zip(bounds, bounds[1:], strict=False):
        for q0 in range(start, end, QUERY_BLOCK):
            q1 = min(q0 + QUERY_BLOCK, end)
            k0 = start if window is None else max(start, q0 - window + 1)
            # [Hkv, G, tq, D] against [Hkv, 1, tk, D]: GQA by broadcasting, K/V never repeated.
            qb = q[q0:q1].float().transpose(0, 1).reshape(hkv, group, q1 - q0, d)
            kb = k[k0:q1].float().transpose(0, 1).unsqueeze(1)
            vb = v[k0:q1].float().transpose(0, 1).unsqueeze(1)
            qpos = torch.arange(q0, q1, device=q.device).view(-1, 1)
            kpos = torch.arange(k0, q1, device=q.device).view(1, -1)
            ob = attend_with_sink(qb, kb, vb, visible_keys(qpos, kpos, window), sink, scale)  # [Hkv, G, tq, D]
            out[q0:q1] = ob.reshape(hq, q1 - q0, d).transpose(0, 1).to(q.dtype)
    return out


def visible_keys(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility of key positions ``kpos`` from query positions ``qpos``."""
    visible = kpos <= qpos
    if window is not None:
        visible = visible & (kpos > qpos - window)
    return visible


def attend_with_sink(
    qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, visible: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax over [visible keys, sink] of scale * q.k, applied to v (the sink column has no value), fp32.
    Rows that see no key give 0 (the sink takes all the mass), never NaN."""
    scores = (qb @ kb.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True) + torch.exp(sink - row_max)
    return (probs @ vb) / denom


def padded_layout(
    bounds: list[int], longest: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed rows -> a right-padded [B, L] batch: ``index`` [B, L] of the packed row at each place (padding
    repeats a valid row), ``valid`` [B, L], and the in-sequence ``offsets`` [L]."""
    starts = torch.tensor(bounds[:-1], device=device)
    lengths = torch.tensor(bounds[1:], device=device) - starts
    offsets = torch.arange(longest, device=device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)
    index = (starts.unsqueeze(1) + offsets).clamp(max=max(bounds[-1] - 1, 0))
    return index, valid, offsets


def _padded_sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor, bounds: list[int], longest: int,
    window: int | None, scale: float,
) -> torch.Tensor:  # fmt: skip
    """Many short sequences at once: gather them into a padded [B, L] batch and attend with one set of batched ops
    (the per-sequence loop costs a few dozen small ops per sequence, which dominates on CPU)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    index, valid, offsets = padded_layout(bounds, longest, q.device)
    b = len(bounds) - 1
    qb = q.float()[index].view(b, longest, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, L, D]
    kb = k.float()[index].permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, L, D]
    vb = v.float()[index].permute(0, 2, 1, 3).unsqueeze(2)
    visible = visible_keys(offsets.view(-1, 1), offsets.view(1, -1), window) & valid.view(b, 1, 1, 1, longest)
    ob = attend_with_sink(qb, kb, vb, visible, sink, scale)  # [B, Hkv, G, L, D]
    ob = ob.permute(0, 3, 1, 2, 4).reshape(b * longest, hq, d)
    return ob[valid.reshape(-1)].to(q.dtype)
