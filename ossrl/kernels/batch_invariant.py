"""Batch-invariant versions of the ops the engine and the trainer run: deterministic mode (``ossrl.deterministic()``).

In this mode the numbers computed for a token depend only on that token's sequence: never on the batch around it,
the packing, the position in the pack, prefill vs decode, or how many tokens are in flight. Every op below has ONE
fixed reduction order per row, and each dispatch point (``ossrl.kernels.linear``, ``rms_norm``, ``sink_attention``,
``decode_ref.paged_decode_attention``, ``moe.moe_experts``, and the log-prob of a sampled token in the sampler and
the trainer) calls it when ``ossrl.kernels.common.deterministic_enabled()``. Plain PyTorch, any device; what makes it
batch-invariant was measured on CPU (``tests/test_deterministic*.py`` check every property on random shapes).

- Matmuls (``linear``: attention projections, router, lm_head, LoRA, expert GEMMs): the rows are cut into blocks of
  ``ROW_BLOCK`` (the last one zero-padded), K and N zero-padded to multiples of ``PAD``, and every block is one
  [ROW_BLOCK, K'] x [K', N'] GEMM of that single shape, in fp32 (bf16/fp16 inputs upcast exactly, fp32 accumulation,
  the output rounded once). A BLAS call chooses its kernel, and so its reduction order, by the shape: on CPU an
  [M, K] product with M = 1 is a GEMV that differs from M > 1 in the last bits, and odd K/N take small-matrix paths
  where a row's result depends on its place in the block; a batched matmul of [1, K] rows against one shared weight
  also changes with the batch size for some shapes (measured). One fixed, regular shape per weight leaves the row
  count nothing to change: no split-K whatever M is (and, measured, the same bits with 1 or 2 threads).
- MoE (``moe_experts``): rows sorted by expert, each expert's rows through ``linear`` (the same path for 1 row or
  10,000; no gathered/grouped switch by batch size), LoRA the same way, SwiGLU elementwise, and the k expert outputs
  summed in slot order.
- Attention (``sink_attention`` over a packed batch: the training forward and the prefill; ``paged_decode_attention``
  over the KV cache: decode steps and tool-result appends): every query reduces over its keys in blocks of
  ``KV_BLOCK`` positions aligned at its sequence's start, from the block holding its first visible key: scores q.k
  (a length-D reduction), one max over the visible keys and the sink (exact), exp, a sum over each block, then the
  block sums added in block order after the sink's term. Both entry points gather, for each query, the same key and
  value arrays (from the packed batch or from the cache's pages; invisible positions zeroed) and call one function
  (``_attend``), so a query gets the same bits on every path.
- Row reductions (RMSNorm, log-sum-exp over the vocabulary, entropy): PyTorch's CPU reductions reduce each row
  serially in a fixed vectorized order that depends only on the row's length, EXCEPT when the whole output is one
  element: a large single row is then split across threads. ``row_sum`` gives such a call a second (zero) row.
- Elementwise ops: fp32 ``torch.sigmoid`` takes different vectorized and scalar code paths (an element at the end of
  a thread's range gets the scalar one, so its result depends on where it sits in the batch); SwiGLU writes the
  sigmoid as 1 / (1 + exp(-x)), whose pieces agree on both paths. Exp, log, cos, sin, rsqrt (fp32), + - * / do.
- Sampling already depends only on (logits, seed, position); the sampled token's log-prob is ``token_logprobs``,
  the trainer's too.

The backward passes are PyTorch's (``linear`` has its own, plain matmuls): deterministic mode is about the forward
numbers the sampler and the trainer must share; gradients are not made batch-invariant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ossrl.kernels.attention_ref import check_sink_attention_inputs
from ossrl.kernels.decode_inputs import check_paged_decode_inputs
from ossrl.kernels.mxfp4_format import dequantize_mxfp4

KV_BLOCK = 64  # keys per attention block: each query sums its keys block by block, blocks aligned at position 0
ROW_BLOCK = 32  # rows per matmul call (every call of a weight has one shape)
PAD = 16  # K and N of a matmul padded with zeros to multiples of PAD (regular shapes: no small-matrix kernels)
QUERY_CHUNK = 64  # queries gathered and attended at once (only memory: a query's result does not depend on it)


# ---- matmul ------------------------------------------------------------------------------------------------------
def _padded(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` in fp32, contiguous, zero-padded at the end of each dim to ``shape`` (``t`` itself when it already is)."""
    if tuple(t.shape) == shape and t.dtype == torch.float32 and t.is_contiguous():
        return t
    out = torch.zeros(shape, dtype=torch.float32, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _block_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    if m == 0:
        return x.new_zeros(*x.shape[:-1], n)
    kp, np_ = -(-k // PAD) * PAD, -(-n // PAD) * PAD
    blocks = _padded(rows, (-(-m // ROW_BLOCK) * ROW_BLOCK, kp)).view(-1, ROW_BLOCK, kp)
    w = _padded(weight, (np_, kp))
    b = None if bias is None else _padded(bias, (np_,))
    out = torch.cat([F.linear(block, w, b) for block in blocks])  # one GEMM shape, whatever m is
    return out[:m, :n].to(x.dtype).reshape(*x.shape[:-1], n)


class _BlockLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _block_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        g = grad.reshape(-1, n)
        dx = (g @ weight.to(g.dtype)).reshape(x.shape) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ x.reshape(-1, k).to(g.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T + bias in fixed-shape blocks of rows (row i of the result depends on x[i] only,
    bitwise), fp32 accumulation, in x's dtype. ``weight`` may be a transposed view (the experts' [K, N] weights)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _BlockLinear.apply(x, weight, bias)
    return _block_linear(x, weight, bias)


# ---- row reductions ----------------------------------------------------------------------------------------------
def row_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, each row reduced serially in the fixed order PyTorch uses for a row of that length.
    A reduction with a single output would split that row across threads: it gets a second, zero row."""
    if x.shape[:-1].numel() == 1 and x.dim() >= 1:
        flat = x.reshape(1, -1)
        return torch.cat([flat, torch.zeros_like(flat)]).sum(-1)[:1].reshape(x.shape[:-1])
    return x.sum(-1)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last dim (fp32 rows): the max (exact), then ``row_sum`` of exp(x - max)."""
    m = x.amax(-1, keepdim=True).detach()
    return (m + torch.log(row_sum(torch.exp(x - m)).unsqueeze(-1))).squeeze(-1)


def token_logprobs(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(x)[token] of each row of x [N, V] (fp32 logits already divided by the temperature): what the
    sampler reports and the trainer computes, by the same arithmetic."""
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logsumexp(x)


def token_logprobs_and_entropy(x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and the entropy of each row's distribution (lse - sum p x)."""
    lse = logsumexp(x)
    probs = torch.exp(x - lse.unsqueeze(-1))
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse, lse - row_sum(probs * x)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim with ``row_sum``'s fixed order (the router's gates over its k experts)."""
    e = torch.exp(x - x.amax(-1, keepdim=True).detach())
    return e / row_sum(e).unsqueeze(-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 with ``row_sum``'s fixed order per row, in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(row_sum(xf * xf).unsqueeze(-1) / xf.shape[-1] + eps)
    return (weight * xf).to(x.dtype)


# ---- MoE ---------------------------------------------------------------------------------------------------------
def swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """``moe.swiglu_clamped`` with the sigmoid as 1 / (1 + exp(-x)): the same bits wherever an element sits."""
    gate, lin = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    lin = lin.clamp(min=-limit, max=limit)
    return gate * (1.0 / (1.0 + torch.exp(-(alpha * gate)))) * (lin + 1)


def _expert_linear(x: torch.Tensor, w, expert: int, bias: torch.Tensor) -> torch.Tensor:
    """``linear`` of rows ``x`` by expert ``expert`` of a dense [E, in, out] or packed (MXFP4) weight. A packed
    expert with a gradient to record goes through ``_PackedBlockLinear``, which keeps the packed expert for the
    backward instead of its dequantized copy (one per expert: a whole layer's worth over the loop)."""
    if isinstance(w, torch.Tensor):
        return linear(x, w[expert].to(x.dtype).t(), bias)
    blocks, scales = w.blocks[expert], w.scales[expert]  # W_e [out, in] = [N, K] packed: linear's layout
    if torch.is_grad_enabled() and (x.requires_grad or bias.requires_grad):
        return _PackedBlockLinear.apply(x, blocks, scales, bias)
    return _block_linear(x, dequantize_mxfp4(blocks, scales, x.dtype), bias)


class _PackedBlockLinear(torch.autograd.Function):
    """``_BlockLinear`` for a frozen MXFP4 expert: no weight gradient; the backward dequantizes it again."""

    @staticmethod
    def forward(ctx, x, blocks, scales, bias):  # type: ignore[override]
        ctx.save_for_backward(blocks, scales)
        return _block_linear(x, dequantize_mxfp4(blocks, scales, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        blocks, scales = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = (g @ dequantize_mxfp4(blocks, scales, g.dtype)).reshape(*grad.shape[:-1], -1)
        db = g.sum(0) if ctx.needs_input_grad[3] else None
        return (dx if ctx.needs_input_grad[0] else None), None, None, db


def moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj,
    gate_up_proj_bias: torch.Tensor,
    down_proj,
    down_proj_bias: torch.Tensor,
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_lora=None,
    down_lora=None,
) -> torch.Tensor:
    """``moe.moe_experts`` (same signature and math), batch-invariant: each (token, expert) row through ``linear``
    with its expert's weight (dense, or MXFP4 dequantized one expert at a time and kept packed for the backward)
    and bias, the expert's LoRA as (x A) B * scale, and the k outputs of a token summed in slot order. Reads the
    experts' row counts on the host."""
    n, k = expert_ids.shape
    num_experts = gate_up_proj_bias.shape[0]
    dtype = x.dtype
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    xs = x[order // k]
    outs, start = [], 0
    for e, count in enumerate(counts):
        if not count:
            continue
        rows = xs[start : start + count]
        start += count
        h = _expert_linear(rows, gate_up_proj, e, gate_up_proj_bias[e].to(dtype))
        if gate_up_lora is not None:
            a, b, scale = gate_up_lora
            h = h + linear(linear(rows, a[e].to(dtype).t()), b[e].to(dtype).t()) * scale
        h = swiglu(h, alpha, limit)
        y = _expert_linear(h, down_proj, e, down_proj_bias[e].to(dtype))
        if down_lora is not None:
            a, b, scale = down_lora
            y = y + linear(linear(h, a[e].to(dtype).t()), b[e].to(dtype).t()) * scale
        outs.append(y)
    y = torch.cat(outs) if outs else x.new_zeros(0, down_proj_bias.shape[-1])
    y = torch.empty_like(y).index_copy(0, order, y).view(n, k, -1)  # back to (token, slot) order
    w = expert_weights.to(y.dtype)
    out = y[:, 0] * w[:, :1]
    for j in range(1, k):  # the k expert outputs of a token, added in slot order
        out = out + y[:, j] * w[:, j : j + 1]
    return out


# ---- attention ---------------------------------------------------------------------------------------------------
def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, sinks: torch.Tensor, scale: float
) -> torch.Tensor:
    """The one attention reduction every path runs. q [R, Hq, D]; keys/values [R, NB * KV_BLOCK, Hkv, D]: query r's
    keys from the first position of the block holding its first visible key, in position order, ZERO where it does
    not see them (the callers gather so); visible [R, L]. Returns [R, Hq, D] fp32. Row r's result depends on row r
    only (trailing all-invisible blocks add exact zeros)."""
    r, hq, d = q.shape
    length, hkv = keys.shape[1], keys.shape[2]
    g, nb = hq // hkv, keys.shape[1] // KV_BLOCK
    kf = keys.float().permute(0, 2, 1, 3).contiguous().unsqueeze(2)  # [R, Hkv, 1, L, D]
    scores = (q.float().reshape(r, hkv, g, 1, d) * kf).sum(-1) * scale  # [R, Hkv, G, L]: a length-D row each
    scores = scores.masked_fill(~visible.view(r, 1, 1, length), float("-inf"))
    sink = sinks.float().view(1, hkv, g)
    m = torch.maximum(scores.amax(-1), sink).detach()  # exact: no order
    p = torch.exp(scores - m.unsqueeze(-1)).view(r, hkv, g, nb, KV_BLOCK)
    vt = values.float().view(r, nb, KV_BLOCK, hkv, d).permute(0, 3, 1, 4, 2).contiguous()  # [R, Hkv, NB, D, KB]
    block_l = p.sum(-1)  # [R, Hkv, G, NB]
    block_o = (p.unsqueeze(-2) * vt.unsqueeze(2)).sum(-1)  # [R, Hkv, G, NB, D]: a length-KV_BLOCK row each
    total = torch.exp(sink - m) + block_l[..., 0]
    out = block_o[..., 0, :]
    for b in range(1, nb):  # block order
        total = total + block_l[..., b]
        out = out + block_o[..., b, :]
    return (out / total.unsqueeze(-1)).reshape(r, hq, d)


def _key_positions(pos: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For queries at positions ``pos`` [R]: the key positions each reduces over, [R, NB * KV_BLOCK] (from the start
    of the block holding its first visible key), and which of them it sees (causal, sliding window)."""
    lo = (pos - window + 1).clamp(min=0) if window is not None else torch.zeros_like(pos)
    first = lo // KV_BLOCK
    nb = int((pos // KV_BLOCK - first).max()) + 1
    keys = first.unsqueeze(1) * KV_BLOCK + torch.arange(nb * KV_BLOCK, device=pos.device)
    return keys, (keys <= pos.unsqueeze(1)) & (keys >= lo.unsqueeze(1))


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
    """``sink_attention_ref`` over a packed batch (same signature and math), batch-invariant (see ``_attend``).
    Differentiable in q, k, v and sinks."""
    check_sink_attention_inputs(q, k, v, sinks, cu_seqlens, max_seqlen, window)
    t, hq, d = q.shape
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    cu = cu_seqlens.long()
    lengths = cu.diff()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths, output_size=t)
    start = cu[:-1][seq]
    pos = torch.arange(t, device=q.device) - start
    hkv = k.shape[1]
    zero = k.new_zeros(1, hkv, d)
    kz, vz = torch.cat([k, zero]), torch.cat([v, zero])  # row t: zeros, where every invisible key is read from
    outs = []
    for r0 in range(0, t, QUERY_CHUNK):
        rows = slice(r0, min(r0 + QUERY_CHUNK, t))
        keys, visible = _key_positions(pos[rows], window)
        slots = torch.where(visible, start[rows].unsqueeze(1) + keys, t).view(-1)
        shape = (*visible.shape, hkv, d)  # index_select: its backward is an index_add (fast), not an index_put
        outs.append(_attend(q[rows], kz.index_select(0, slots).view(shape), vz.index_select(0, slots).view(shape),
                            visible, sinks, scale))  # fmt: skip
    return torch.cat(outs).to(q.dtype) if outs else q.new_zeros(q.shape)


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
    kv_chunk: int = 256,
) -> torch.Tensor:
    """``decode_ref.paged_decode_attention_ref`` (same signature and math), batch-invariant: each new token gathers
    its keys from the cache's pages and runs the reduction of the training path (``_attend``), so a token gets the
    bits the packed training forward gives it. ``kv_chunk`` is ignored (the blocks are ``KV_BLOCK``). Reads lengths
    on the host."""
    check_paged_decode_inputs(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, max_q_len, sinks, window, kv_chunk)
    n, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    if n == 0:
        return q.new_zeros(q.shape)
    cu = cu_q_lens.long()
    q_lens = cu.diff()
    seq = torch.repeat_interleave(torch.arange(q_lens.numel(), device=q.device), q_lens, output_size=n)
    pos = seq_lens.long()[seq] - q_lens[seq] + torch.arange(n, device=q.device) - cu[:-1][seq]
    flat_k, flat_v = k_cache.reshape(-1, hkv, d), v_cache.reshape(-1, hkv, d)
    width = page_table.shape[1]
    outs = []
    for r0 in range(0, n, QUERY_CHUNK):
        rows = slice(r0, min(r0 + QUERY_CHUNK, n))
        keys, visible = _key_positions(pos[rows], window)
        pages = page_table[seq[rows].unsqueeze(1), (keys // page_size).clamp(max=width - 1)].long()
        slots = pages * page_size + keys % page_size  # invisible positions: any page in range, zeroed here
        seen = visible.view(*visible.shape, 1, 1)
        keys_, values = torch.where(seen, flat_k[slots], 0.0), torch.where(seen, flat_v[slots], 0.0)
        outs.append(_attend(q[rows], keys_, values, visible, sinks, scale))
    return torch.cat(outs).to(q.dtype)
