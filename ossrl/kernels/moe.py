"""The MoE expert computation: each token goes only to the experts its router chose.

Tokens are sorted by expert and each expert multiplies one contiguous slice (a grouped GEMM), so no activation
is ever copied once per expert. On CUDA with bf16/fp16 the slices go through ``torch._grouped_mm`` in a single
launch; elsewhere a loop over the experts that were hit does the same math.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from ossrl.kernels import warn_once

Weight = torch.Tensor | Callable[[], torch.Tensor]


def swiglu_clamped(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's SwiGLU: gate/linear interleaved (even/odd columns), gate clamped above at ``limit``, linear to
    [-limit, limit]; out = gate * sigmoid(alpha * gate) * (linear + 1)."""
    gate, linear = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


@cache
def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
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


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, counts_list: list[int]) -> torch.Tensor:
    """Rows of ``x`` [N, K] sorted by group; group g (``counts[g]`` rows) is multiplied by ``weight[g]`` [K, M]."""
    if _grouped_mm_works(x.device, x.dtype) and x.shape[1] % 8 == 0 and weight.shape[2] % 8 == 0:
        grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return grouped_mm(x, weight, offs=offs)
    if x.is_cuda:
        warn_once("grouped_mm", f"grouped_mm unavailable for {x.dtype} {tuple(weight.shape)}; looping over experts")
    out = x.new_empty(x.shape[0], weight.shape[2])
    start = 0
    for g, n in enumerate(counts_list):
        if n:
            out[start : start + n] = x[start : start + n] @ weight[g]
        start += n
    return out


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
) -> torch.Tensor:
    """Mixture of experts over the chosen experts only.

    x [N, H]; expert_ids [N, k] long; expert_weights [N, k] (router softmax over the chosen k);
    gate_up_proj [E, H, 2I] (or a callable returning it, e.g. an MXFP4 weight's dequantize), gate_up_proj_bias
    [E, 2I]; down_proj [E, I, H], down_proj_bias [E, H]. Returns [N, H] in x's dtype.
    The k expert outputs of a token are summed in a fixed order, so the result is deterministic.
    """
    n, k = expert_ids.shape
    num_experts = gate_up_proj_bias.shape[0]
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts)
    counts_list = counts.tolist()
    token_of = order // k
    xs = x[token_of]
    w_gate_up = gate_up_proj() if callable(gate_up_proj) else gate_up_proj
    w_down = down_proj() if callable(down_proj) else down_proj
    sorted_ids = flat_ids[order]
    h = grouped_matmul(xs, w_gate_up.to(x.dtype), counts, counts_list) + gate_up_proj_bias[sorted_ids].to(x.dtype)
    h = swiglu_clamped(h, alpha, limit)
    y = grouped_matmul(h, w_down.to(x.dtype), counts, counts_list) + down_proj_bias[sorted_ids].to(x.dtype)
    unsorted = torch.empty_like(y).index_copy(0, order, y)  # back to (token, slot) order
    return (unsorted.view(n, k, -1) * expert_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
