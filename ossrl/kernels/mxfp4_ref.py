"""The MXFP4 grouped GEMM: its plain-torch reference and its entry point (the one dispatch).

``mxfp4_grouped_matmul(x, blocks, scales, counts)``: rows of ``x`` [R, in] sorted by expert (``counts[e]`` rows for
expert e) times W_e^T, W stored in MXFP4 (layout and numerics: ``mxfp4_format``). On CUDA it runs the Triton kernel
of ``mxfp4_triton`` (dequantizing in registers) once a self-check on the device has passed; elsewhere the reference
below dequantizes and multiplies expert by expert.
"""

from __future__ import annotations

import torch

from ossrl.kernels.common import warn_once
from ossrl.kernels.mxfp4_format import check_mxfp4_grouped_inputs, dequantize_mxfp4


def mxfp4_grouped_matmul_ref(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Reference: dequantize every expert to x's dtype, then a matmul per expert (reads ``counts`` on the host).
    Returns [R, N] in x's dtype."""
    check_mxfp4_grouped_inputs(x, blocks, scales, counts)
    weights = dequantize_mxfp4(blocks, scales, x.dtype)  # [E, N, K]
    out = x.new_zeros(x.shape[0], blocks.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = x[start : start + n] @ weights[e].T
        start += n
    return out


@torch.library.custom_op("ossrl::mxfp4_grouped_matmul", mutates_args=())
def _triton_op(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The Triton kernel as one opaque op: a ``torch.compile`` trace keeps it whole (no graph break)."""
    from ossrl.kernels.mxfp4_triton import mxfp4_grouped_matmul_triton

    return mxfp4_grouped_matmul_triton(x, blocks, scales, counts)


@_triton_op.register_fake
def _(x, blocks, scales, counts):
    return x.new_empty(x.shape[0], blocks.shape[1])


_KERNEL_WORKS: dict[tuple[torch.device, torch.dtype], bool] = {}


@torch.compiler.assume_constant_result  # a torch.compile trace takes the answer, never traces the self-check
def mxfp4_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel runs on ``device`` for ``dtype`` and agrees with the reference (checked once)."""
    if (device, dtype) not in _KERNEL_WORKS:
        _KERNEL_WORKS[device, dtype] = _self_check(device, dtype)
    return _KERNEL_WORKS[device, dtype]


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):  # where moe uses it (expert_path)
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(40, 96, device=device, dtype=dtype, generator=gen)
        blocks = torch.randint(0, 256, (3, 80, 3, 16), device=device, dtype=torch.uint8, generator=gen)
        scales = torch.randint(120, 130, (3, 80, 3), device=device, dtype=torch.uint8, generator=gen)
        counts = torch.tensor([17, 0, 23], device=device)
        got = _triton_op(x, blocks, scales, counts).float()
        want = mxfp4_grouped_matmul_ref(x, blocks, scales, counts).float()
        error = ((got - want).norm() / want.norm()).item()
        if error > 1e-2:
            warn_once("mxfp4_kernel", f"MXFP4 Triton kernel disagrees with the reference on {device} {dtype} "
                      f"(relative error {error:.2e}); dequantizing instead")  # fmt: skip
            return False
        return True
    except Exception as err:  # any failure to build or run it: the reference path still works
        warn_once("mxfp4_kernel", f"MXFP4 Triton kernel unavailable on {device} {dtype} ({type(err).__name__}: "
                  f"{err}); dequantizing instead")  # fmt: skip
        return False


def mxfp4_grouped_matmul(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """The Triton kernel where it works (CUDA, self-checked), the reference elsewhere. Inference only: the kernel
    has no backward, so callers take the reference when gradients must flow to ``x``."""
    if mxfp4_kernel_works(x.device, x.dtype):  # False off CUDA
        return _triton_op(x, blocks, scales, counts)
    return mxfp4_grouped_matmul_ref(x, blocks, scales, counts)
