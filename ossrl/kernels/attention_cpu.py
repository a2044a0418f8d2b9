"""Attention with sinks on CPU through PyTorch's fused CPU flash-attention kernels.

Same signature and math as ``attention_ref.sink_attention_ref``; 2-4x faster on CPU for training-size batches
(the reference materialises every score and runs a dozen separate ops over them). The sequences are padded into
one [B, H, L, D] batch (right padding: causality alone keeps padded keys away from real queries), attended by
``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp L of each row. The sink
then only rescales: out = o * exp(L - L'), with L' = logaddexp(L, sink). The backward calls the fused backward with
L' in place of L, so it recomputes the probabilities with the sink in the denominator, which is exactly the
gradient of attention with a sink (as in the Triton kernel); dsink_h = -sum_i exp(sink_h - L'_i) * rowsum(dO*O)_i.

Used for fp32 when the padding wastes at most half the batch; everything else goes to the reference.
"""

from __future__ import annotations

import torch

from ossrl.kernels.attention_ref import padded_layout

_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
MAX_WINDOW_MASK = 2**24  # L * L entries of the additive window mask


def available() -> bool:
    return _FORWARD is not None and _BACKWARD is not None


class _SinkFlashCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, mask, causal: bool, scale: float):  # type: ignore[override]
        o, lse = _FORWARD.default(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        lse_total = torch.logaddexp(lse, sink.view(1, -1, 1))
        out = o * torch.exp(lse - lse_total).unsqueeze(-1)
        ctx.save_for_backward(q, k, v, out, lse_total, sink)
        ctx.mask, ctx.causal, ctx.scale = mask, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse_total, sink = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _BACKWARD.default(dout, q, k, v, out, lse_total, 0.0, ctx.causal, attn_mask=ctx.mask,
                                       scale=ctx.scale)  # fmt: skip
        delta = (dout * out).sum(-1)
        dsink = -(torch.exp(sink.view(1, -1, 1) - lse_total) * delta).sum((0, 2))
        return dq, dk, dv, dsink, None, None, None


def fits(q: torch.Tensor, bounds: list[int], window: int | None) -> bool:
    """Whether the fused CPU path applies: fp32 on CPU, padding at most doubles the tokens, a window mask that is
    not too large."""
    if not available() or q.device.type != "cpu" or q.dtype != torch.float32 or len(bounds) < 2 or q.shape[0] == 0:
        return False
    longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    if longest == 0 or (len(bounds) - 1) * longest > 2 * q.shape[0]:
        return False
    return window is None or window >= longest or longest * longest <= MAX_WINDOW_MASK


def sink_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``sink_attention_ref`` through the fused CPU kernels (callers check ``fits`` first; inputs already checked)."""
    hq, d = q.shape[1:]
    hkv = k.shape[1]
    bounds = cu_seqlens.tolist()
    b = len(bounds) - 1
    longest = max(end - start for start, end in zip(bounds, bounds[1:], strict=False))
    index, valid, offsets = padded_layout(bounds, longest, q.device)
    # index_select rather than advanced indexing: its backward is an index_add, several times faster on CPU than
    # the accumulating index_put that advanced indexing backpropagates through.
    index = index.view(-1)
    qb = q.index_select(0, index).view(b, longest, hq, d).permute(0, 2, 1, 3)  # [B, Hq, L, D]
    # GQA: the fused kernel wants one K/V head per q head
    kb = k.index_select(0, index).view(b, longest, hkv, d).permute(0, 2, 1, 3).repeat_interleave(hq // hkv, dim=1)
    vb = v.index_select(0, index).view(b, longest, hkv, d).permute(0, 2, 1, 3).repeat_interleave(hq // hkv, dim=1)
    mask, causal = None, True
    if window is not None and window < longest:
        qpos, kpos = offsets.view(-1, 1), offsets.view(1, -1)
        visible = (kpos <= qpos) & (kpos > qpos - window)
        mask = torch.zeros(1, 1, longest, longest).masked_fill(~visible, float("-inf"))
        causal = False
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    ob = _SinkFlashCPU.apply(qb, kb, vb, sinks.float(), mask, causal, scale)
    rows = valid.view(-1).nonzero().squeeze(1)
    return ob.permute(0, 2, 1, 3).reshape(b * longest, hq, d).index_select(0, rows)
