"""Kernels behind the model's two hot functions: attention with sinks, and the MoE expert computation.

Each kernel has a plain-torch reference with the same signature; the reference runs wherever the kernel cannot
(CPU, unsupported dtype or head size) and is what tests compare against. A fallback is logged once, loudly.
"""

from __future__ import annotations

import logging

import torch

from ossrl.kernels.attention_ref import check_sink_attention_inputs, sink_attention_ref

log = logging.getLogger(__name__)
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention with one learnable sink logit per q head over a packed variable-length batch.

    q [T, Hq, D], k/v [T, Hkv, D] (Hq a multiple of Hkv), sinks [Hq] fp32, cu_seqlens int32 [B+1];
    ``window=W`` lets query i see keys i-W+1 .. i. Returns [T, Hq, D]. See ``attention_ref`` for the math.
    """
    if q.is_cuda:
        warn_once(
            "sink_attention",
            "sink_attention: no Triton kernel available here, using the plain-torch reference (slow on GPU)",
        )
    return sink_attention_ref(q, k, v, sinks, cu_seqlens, max_seqlen, window, softmax_scale)


__all__ = ["sink_attention", "sink_attention_ref", "check_sink_attention_inputs", "warn_once"]
