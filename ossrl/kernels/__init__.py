"""Kernels behind the model's two hot functions: attention with sinks, and the MoE expert computation.

Each kernel has a plain-torch reference with the same signature; the reference runs wherever the kernel cannot
(CPU, unsupported dtype or head size) and is what tests compare against. A fallback is logged once, loudly. On CPU,
training attention goes through PyTorch's fused CPU flash kernels where they apply (``attention_cpu``).

One convention for every op: ONE dispatch function, beside its reference and its Triton kernel, picks the path;
what the reference and the kernel both need (input checks, the numeric format) lives in a module of its own, so the
import graph has no cycle (``tests/test_import_graph.py``), lazy imports included:

  op                   dispatch                                 reference                 Triton kernel
  sink attention       ``sink_attention`` (here)                ``attention_ref``         ``attention_triton``
  paged decode         ``decode_ref.paged_decode_attention``    ``decode_ref``            ``decode_triton``
  MXFP4 grouped GEMM   ``mxfp4_ref.mxfp4_grouped_matmul``       ``mxfp4_ref``             ``mxfp4_triton``
    (+ its dX)         (differentiable in x: fwd and dX ops)    (one expert at a time)    (fwd and dX kernels)
  MoE experts          ``moe.moe_experts``                      (same module)             (uses the MXFP4 GEMM)
  linear (x W^T + b)   ``linear`` (here)                        ``F.linear``              (cuBLAS / MKL)
  RMSNorm              ``rms_norm`` (here)                      (same function)
  softmax (router)     ``softmax`` (here)                       ``torch.softmax``

Deterministic mode (``ossrl.deterministic()``, flag in ``common``): each dispatch above, and the sampled token's
log-prob in the sampler and the trainer, runs its batch-invariant version from ``batch_invariant`` instead (one fixed
reduction order per row: a token's numbers depend on its sequence only, never on the batch). The fast paths are
untouched.

Shared by the reference and the kernel: ``attention_ref`` (sink attention's checks), ``decode_inputs`` (paged
decode's), ``mxfp4_format`` (MXFP4 numerics, the one place they live, and the MXFP4 GEMM's checks). ``common``
holds ``warn_once`` and ``triton_interpreting``; kernel modules import them from there, never from this package.
Triton modules are imported only by their dispatch, when a CUDA tensor needs them: importing Triton reads
TRITON_INTERPRET, and CPU-only installs need no Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ossrl.kernels import attention_cpu, batch_invariant
from ossrl.kernels.attention_ref import check_sink_attention_inputs, sink_attention_ref
from ossrl.kernels.common import _warned as _warned  # the set lives in common: reset common._warned to re-warn
from ossrl.kernels.common import deterministic_enabled, planned_gpu, triton_interpreting, warn_once
from ossrl.kernels.decode_ref import check_paged_decode_inputs, paged_decode_attention, paged_decode_attention_ref


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
    if deterministic_enabled():
        return batch_invariant.sink_attention(q, k, v, sinks, cu_seqlens, max_seqlen, window, softmax_scale)
    if q.is_cuda or planned_gpu(q.device):  # (planning: the meta device stands for the GPU)
        try:  # imported here: importing Triton kernels reads TRITON_INTERPRET, and CPU-only installs need no Triton
            from ossrl.kernels.attention_triton import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, sink_attention_triton
        except ImportError as err:
            warn_once("sink_attention", f"sink_attention: Triton unavailable ({err}); using the plain-torch reference")
        else:
            if q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES:
                return sink_attention_triton(q, k, v, sinks, cu_seqlens, max_seqlen, window, softmax_scale)
            warn_once(
                "sink_attention",
                f"sink_attention: no Triton kernel for {q.dtype}, head dim {q.shape[-1]}; using the plain-torch "
                "reference (slow on GPU)",
            )
    elif q.device.type == "cpu":
        check_sink_attention_inputs(q, k, v, sinks, cu_seqlens, max_seqlen, window)
        if attention_cpu.fits(q, cu_seqlens.tolist(), window):
            return attention_cpu.sink_attention_cpu(q, k, v, sinks, cu_seqlens, max_seqlen, window, softmax_scale)
    return sink_attention_ref(q, k, v, sinks, cu_seqlens, max_seqlen, window, softmax_scale)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias (``F.linear``); batch-invariant (fixed-shape row blocks) in deterministic mode."""
    if deterministic_enabled():
        if x.is_cuda:
            warn_once("deterministic_cuda", "deterministic mode on CUDA runs the batch-invariant PyTorch code of "
                      "ossrl.kernels.batch_invariant (no Triton kernels yet); it is not yet tested or measured on a "
                      "GPU")  # fmt: skip
        return batch_invariant.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 (weight fp32), returned in x's dtype."""
    if deterministic_enabled():
        return batch_invariant.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim (the router's gates over its chosen experts), in x's dtype."""
    if deterministic_enabled():
        return batch_invariant.softmax(x)
    return torch.softmax(x, dim=-1)


_LAZY = {  # Triton-backed exports, imported on first use (see the note in sink_attention)
    "sink_attention_triton": "ossrl.kernels.attention_triton",
    "paged_decode_attention_triton": "ossrl.kernels.decode_triton",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "deterministic_enabled",
    "linear",
    "rms_norm",
    "softmax",
    "sink_attention",
    "sink_attention_ref",
    "sink_attention_triton",
    "check_sink_attention_inputs",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_decode_attention_triton",
    "check_paged_decode_inputs",
    "triton_interpreting",
    "warn_once",
]
