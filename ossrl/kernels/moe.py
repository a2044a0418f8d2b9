"""The MoE expert computation: each token goes only to the experts its router chose.

Tokens are sorted by expert and each expert multiplies one contiguous slice (a grouped GEMM), so no activation
is ever copied once per expert. On CUDA with bf16/fp16 the slices go through ``torch._grouped_mm`` in a single
launch; elsewhere a loop over the experts that were hit does the same math. Per-expert LoRA adapters ride on the
same sorted activations and the same grouped GEMMs (they never need the base weight).

MXFP4 expert weights stay packed through training: an MXFP4 expert GEMM goes through ``mxfp4_ref.
mxfp4_grouped_matmul``, differentiable in its input (dX = dY @ W_e; frozen weights, no weight gradient), which
saves nothing for the backward but the packed weights, so no dequantized copy of a layer is ever kept. On CUDA in
bf16/fp16 (self-checked) its forward and dX are Triton kernels that dequantize in registers; elsewhere one expert is
dequantized at a time. This is decided for each of the two GEMMs from its own input (``_grouped``): a GEMM whose
input needs a gradient always takes the packed op; one that needs none takes it on rollout-sized batches and on the
CPU loop, while large no-grad batches on CUDA (prefill) dequantize the layer once, transiently, for one
``torch._grouped_mm`` (the kernel dequantizes a weight tile again for every block of rows). Decode-sized batches
(fewer (token, expert) pairs than experts) take a third path when the weights are packed or there is no grouped
GEMM: each pair gathers its own expert's weight (dequantizing only the chosen experts) and one batched matmul runs
them all. It never reads group sizes on the host, so a CUDA graph can capture it; ``expert_path`` says which path a
batch takes.

Long sequences: ``moe_experts(..., chunk_tokens=C)`` runs the tokens C at a time, each chunk under non-reentrant
activation checkpointing when autograd records, so a layer never holds the [tokens * k, 2 * intermediate]
activations of all its tokens at once (forward, or the backward's recompute). Same results as unchunked, up to the
summation order of the LoRA/bias gradients across chunks.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ossrl.kernels import batch_invariant, mxfp4_ref
from ossrl.kernels.common import deterministic_enabled, planned_gpu, planning, warn_once


class PackedWeight(Protocol):
    """An expert weight kept packed (``ossrl.model.MXFP4Weight``, which also has ``blocks`` and ``scales``)."""

    def dequantize(self, dtype: torch.dtype, experts: torch.Tensor | None = None) -> torch.Tensor:
        """W^T [E, in, out] in ``dtype``; with ``experts`` (ids [R]) only those, [R, in, out]."""
        ...


Weight = torch.Tensor | PackedWeight  # dense [E, in, out], or packed
LoraFactors = tuple[torch.Tensor, torch.Tensor, float]  # A [E, in, r], B [E, r, out], scale (alpha / r)


def swiglu_clamped(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's SwiGLU: gate/linear interleaved (even/odd columns), gate clamped above at ``limit``, linear to
    [-limit, limit]; out = gate * sigmoid(alpha * gate) * (linear + 1)."""
    gate, linear = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


_GROUPED_MM_WORKS: dict[tuple[torch.device, torch.dtype], bool] = {}


@torch.compiler.assume_constant_result  # a torch.compile trace takes the answer, never traces the probe
def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    if planned_gpu(device):  # planning (``ossrl.memory``): the GPU's answer, nothing run, nothing cached
        return dtype in (torch.bfloat16, torch.float16)
    if (device, dtype) not in _GROUPED_MM_WORKS:
        _GROUPED_MM_WORKS[device, dtype] = _probe_grouped_mm(device, dtype)
    return _GROUPED_MM_WORKS[device, dtype]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped_mm is None or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        x = torch.randn(32, 16, device=device, dtype=dtype)
        w = torch.randn(2, 16, 16, device=device, dtype=dtype)
        grouped_mm(x, w, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


# The MXFP4 kernel re-dequantizes each weight tile per 16-row block of an expert's rows: past ~64 rows per expert
# (large prefills, no-grad passes over whole batches) dequantizing once and one grouped GEMM does less work.
MXFP4_KERNEL_ROWS_PER_EXPERT = 64


def expert_path(
    rows: int, num_experts: int, device: torch.device, dtype: torch.dtype, packed: bool, mxfp4_kernel: bool = False
) -> str:
    """How ``moe_experts`` runs ``rows`` (token, expert) pairs: "mxfp4" (rows sorted by expert, every MXFP4 GEMM
    through the packed grouped GEMM that dequantizes in registers: ``mxfp4_kernel`` says the Triton kernels run
    here (MXFP4 weight, CUDA, bf16/fp16, self-checked); rollout-sized batches only: the kernel dequantizes a weight
    tile again for every block of rows), "gathered" (a weight per pair; decode-sized batches of packed weights or
    without a grouped GEMM), "grouped" (``torch._grouped_mm``; an MXFP4 GEMM whose input needs a gradient still
    takes the packed op, the others dequantize their layer once, transiently) or "loop" (a matmul per hit expert,
    MXFP4 experts dequantized one at a time: the only path that reads group sizes on the host, which a CUDA graph
    cannot capture)."""
    grouped = _grouped_mm_works(device, dtype)
    if packed and mxfp4_kernel and grouped and rows <= MXFP4_KERNEL_ROWS_PER_EXPERT * num_experts:
        return "mxfp4"
    if rows < num_experts and (packed or not grouped):
        return "gathered"
    return "grouped" if grouped else "loop"


def grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, counts_list: list[int] | None = None
) -> torch.Tensor:
    """Rows of ``x`` [N, K] sorted by group; group g (``counts[g]`` rows) is multiplied by ``weight[g]`` [K, M].
    ``counts_list`` (``counts`` on the host) is only read by the loop fallback; None reads it there."""
    if _grouped_mm_works(x.device, x.dtype) and x.shape[1] % 8 == 0 and weight.shape[2] % 8 == 0:
        grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return grouped_mm(x, weight, offs=offs)
    if x.is_cuda:
        warn_once("grouped_mm", f"grouped_mm unavailable for {x.dtype} {tuple(weight.shape)}; looping over experts")
    out = x.new_empty(x.shape[0], weight.shape[2])
    if planning():  # shape-only tensors (``ossrl.memory``): the loop's memory is this output (its products are brief)
        return out
    start = 0
    for g, n in enumerate(counts.tolist() if counts_list is None else counts_list):
        if n:
            out[start : start + n] = x[start : start + n] @ weight[g]
        start += n
    return out


def grouped_lora(
    x: torch.Tensor, lora: LoraFactors, counts: torch.Tensor, counts_list: list[int] | None = None
) -> torch.Tensor:
    """The per-expert low-rank update of rows sorted by expert: (x_g @ A_g @ B_g) * scale for every group g.

    r is zero-padded to a multiple of 8 (grouped_mm's alignment; zero columns of A meet zero rows of B, so the
    result is unchanged) so small ranks keep the single-launch path on CUDA."""
    a, b, scale = lora
    e, fan_in, r = a.shape
    if (e, fan_in) != (counts.shape[0], x.shape[1]) or tuple(b.shape[:2]) != (e, r):
        raise ValueError(f"LoRA factors {tuple(a.shape)} / {tuple(b.shape)} do not fit x {tuple(x.shape)}")
    pad = -r % 8
    a = F.pad(a.to(x.dtype), (0, pad))
    b = F.pad(b.to(x.dtype), (0, 0, 0, pad))
    return grouped_matmul(grouped_matmul(x, a, counts, counts_list), b, counts, counts_list) * scale


def moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: Weight,
    gate_up_proj_bias: torch.Tensor,
    down_proj: Weight,
    down_proj_bias: torch.Tensor,
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_lora: LoraFactors | None = None,
    down_lora: LoraFactors | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Mixture of experts over the chosen experts only.

    x [N, H]; expert_ids [N, k] long; expert_weights [N, k] (router softmax over the chosen k);
    gate_up_proj [E, H, 2I] (or a ``PackedWeight``), gate_up_proj_bias [E, 2I];
    down_proj [E, I, H], down_proj_bias [E, H]. Returns [N, H] in x's dtype.
    ``gate_up_lora`` / ``down_lora``: optional per-expert LoRA (A [E, in, r], B [E, r, out], scale), so expert e
    computes x @ (W_e + scale * A_e @ B_e) without ever forming the sum; computed in x's dtype.
    The k expert outputs of a token are summed in a fixed order, so the result is deterministic. In deterministic
    mode (``ossrl.deterministic()``) ``batch_invariant.moe_experts`` runs: the same path whatever the batch size.
    ``chunk_tokens``: with more tokens than this, run them in chunks of that many, each under non-reentrant
    activation checkpointing when autograd records (memory over long sequences; see the module docstring).
    """
    args = (gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, alpha, limit, gate_up_lora, down_lora)
    if chunk_tokens is not None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive int or None; got {chunk_tokens!r}")
        if x.shape[0] > chunk_tokens:
            return _chunked(x, expert_ids, expert_weights, args, chunk_tokens)
    return _moe_experts(x, expert_ids, expert_weights, *args)


def _chunked(x, expert_ids, expert_weights, args, chunk_tokens: int) -> torch.Tensor:
    """``_moe_experts`` over ``chunk_tokens`` tokens at a time; each chunk checkpointed when autograd records, so
    its activations are dropped after the forward and recomputed, one chunk at a time, in the backward."""
    tensors = (x, expert_weights, *args[:4], *(args[6] or ())[:2], *(args[7] or ())[:2])
    checkpointed = _needs_grad(*tensors)
    outs = []
    for start in range(0, x.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        chunk = (x[part], expert_ids[part], expert_weights[part], *args)
        if checkpointed:
            outs.append(checkpoint(_moe_experts, *chunk, use_reentrant=False))
        else:
            outs.append(_moe_experts(*chunk))
    return torch.cat(outs)


def _moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: Weight,
    gate_up_proj_bias: torch.Tensor,
    down_proj: Weight,
    down_proj_bias: torch.Tensor,
    alpha: float,
    limit: float,
    gate_up_lora: LoraFactors | None,
    down_lora: LoraFactors | None,
) -> torch.Tensor:
    if deterministic_enabled():
        return batch_invariant.moe_experts(x, expert_ids, expert_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                                           down_proj_bias, alpha, limit, gate_up_lora, down_lora)  # fmt: skip
    n, k = expert_ids.shape
    num_experts = gate_up_proj_bias.shape[0]
    packed = not isinstance(gate_up_proj, torch.Tensor) or not isinstance(down_proj, torch.Tensor)
    kernel = _mxfp4_kernel(x, gate_up_proj, down_proj)
    path = expert_path(n * k, num_experts, x.device, x.dtype, packed, kernel)
    if path == "gathered":
        return _gathered_experts(x, expert_ids, expert_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                                 down_proj_bias, alpha, limit, gate_up_lora, down_lora)  # fmt: skip
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    # Rows per expert without a host round trip (torch.bincount reads max(ids) on the host: a GPU sync per layer).
    counts = torch.searchsorted(sorted_ids, torch.arange(num_experts + 1, device=x.device)).diff()
    counts_list = counts.tolist() if path == "loop" and not planning() else None
    token_of = order // k
    xs = x[token_of]
    h = _grouped(xs, gate_up_proj, counts, counts_list, path) + gate_up_proj_bias[sorted_ids].to(x.dtype)
    if gate_up_lora is not None:
        h = h + grouped_lora(xs, gate_up_lora, counts, counts_list)
    h = swiglu_clamped(h, alpha, limit)
    y = _grouped(h, down_proj, counts, counts_list, path) + down_proj_bias[sorted_ids].to(x.dtype)
    if down_lora is not None:
        y = y + grouped_lora(h, down_lora, counts, counts_list)
    unsorted = torch.empty_like(y).index_copy(0, order, y)  # back to (token, slot) order
    return (unsorted.view(n, k, -1) * expert_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)


def _weight(w: Weight, ids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Experts ``ids`` (all for None) of a dense or packed weight, in ``dtype``."""
    if isinstance(w, torch.Tensor):
        return (w if ids is None else w[ids]).to(dtype)
    return w.dequantize(dtype, ids)


def _grouped(xs: torch.Tensor, w: Weight, counts: torch.Tensor, counts_list: list[int] | None, path: str):
    """One expert GEMM of the sorted rows, decided here from this GEMM's own input. An MXFP4 ``w`` goes through the
    packed op (``mxfp4_grouped_matmul``: Triton kernels or one expert dequantized at a time, differentiable in
    ``xs``, nothing dequantized kept for the backward) on the "mxfp4" and "loop" paths and whenever a gradient must
    reach ``xs``; only a no-grad GEMM on the "grouped" path (large batches on CUDA) dequantizes the whole layer,
    transiently, for one grouped GEMM. A dense ``w`` takes the grouped GEMM."""
    if hasattr(w, "blocks") and (path in ("mxfp4", "loop") or _needs_grad(xs)):
        return mxfp4_ref.mxfp4_grouped_matmul(xs, w.blocks, w.scales, counts)
    return grouped_matmul(xs, _weight(w, None, xs.dtype), counts, counts_list)


def _needs_grad(*tensors: object) -> bool:
    """Whether autograd records an op on any of ``tensors`` (a packed weight never needs one)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _mxfp4_kernel(x: torch.Tensor, gate_up_proj: Weight, down_proj: Weight) -> bool:
    """Whether the MXFP4 Triton kernels can run the packed expert GEMMs (``expert_path``'s ``mxfp4_kernel``): at
    least one weight is MXFP4 and the kernels passed their self-check for x's device and dtype (False off CUDA).
    They have a backward (dX), so gradients no longer matter here."""
    if not (hasattr(gate_up_proj, "blocks") or hasattr(down_proj, "blocks")):
        return False
    return mxfp4_ref.mxfp4_kernel_works(x.device, x.dtype)


def _gathered_experts(
    x, expert_ids, expert_weights, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, alpha, limit,
    gate_up_lora, down_lora,
) -> torch.Tensor:  # fmt: skip
    """The same math with one weight per (token, expert) pair: W[ids] and a batched matmul, no sort, no host
    reads. Reads (and for packed weights dequantizes) only the chosen experts."""
    n, k = expert_ids.shape
    ids = expert_ids.reshape(-1)
    xs = x.unsqueeze(1).expand(n, k, x.shape[-1]).reshape(n * k, 1, x.shape[-1])  # [R, 1, H]

    def lora(inputs: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
        a, b, scale = factors
        return torch.bmm(torch.bmm(inputs, a[ids].to(x.dtype)), b[ids].to(x.dtype)) * scale

    h = torch.bmm(xs, _weight(gate_up_proj, ids, x.dtype)) + gate_up_proj_bias[ids].to(x.dtype).unsqueeze(1)
    if gate_up_lora is not None:
        h = h + lora(xs, gate_up_lora)
    h = swiglu_clamped(h, alpha, limit)
    y = torch.bmm(h, _weight(down_proj, ids, x.dtype)) + down_proj_bias[ids].to(x.dtype).unsqueeze(1)
    if down_lora is not None:
        y = y + lora(h, down_lora)
    return (y.view(n, k, -1) * expert_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
