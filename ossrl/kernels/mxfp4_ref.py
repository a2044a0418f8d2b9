"""MXFP4 numerics (the format gpt-oss ships its experts in) and the plain-torch reference of the MXFP4 grouped GEMM.

An expert matrix W [E, out, in] is stored as ``blocks`` uint8 [E, out, in/32, 16] (32 E2M1 codes per block, two per
byte, LOW nibble first) and ``scales`` uint8 [E, out, in/32] (one E8M0 power of two per block, bias 127): element j
of a block is FP4_VALUES[code_j] * 2**(scale - 127).

``mxfp4_grouped_matmul(x, blocks, scales, counts)``: rows of ``x`` [R, in] sorted by expert (``counts[e]`` rows for
expert e) times W_e^T. On CUDA it runs the Triton kernel of ``mxfp4_triton`` (dequantizing in registers) once a
self-check on the device has passed; elsewhere the reference below dequantizes and calls the grouped GEMM.
"""

from __future__ import annotations

from functools import cache

import torch

from ossrl.kernels import warn_once
from ossrl.kernels.moe import grouped_matmul

BLOCK = 32
# E2M1 code -> value: sign bit 3, exponent bits 2-1, mantissa bit 0.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., out, G, 16] uint8 + scales [..., out, G] -> dense [..., out, G*32] in ``dtype``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8; got {blocks.dtype}, {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    pairs = torch.index_select(_byte_values(blocks.device), 0, blocks.flatten().int())  # [N, 2]: low, high nibble
    values = pairs.view(*blocks.shape[:-1], BLOCK) * _powers_of_two(scales).unsqueeze(-1)  # exact in fp32
    return values.flatten(-2).to(dtype)


def _powers_of_two(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 scales -> 2**(s - 127) in fp32, built from the bits (exact on every device, unlike exp2): exponent
    field s for s >= 1, the subnormal 2**-127 for s = 0; 255 gives inf."""
    exponent = scales.to(torch.int32)
    return torch.where(exponent > 0, exponent << 23, 1 << 22).view(torch.float32)


@cache
def _byte_values(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: a byte's two E2M1 values, low nibble first. Made once per device (a host-to-device copy per
    call would break CUDA graph capture), and a normal tensor even when first made under inference mode."""
    with torch.inference_mode(False):
        values = torch.tensor(FP4_VALUES, dtype=torch.float32)
        return torch.stack((values.repeat(16), values.repeat_interleave(16)), dim=-1).to(device)


def check_mxfp4_grouped_inputs(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> None:
    """Clear errors for bad shapes, dtypes and devices (counts' values are not read: that would wait for the GPU)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating [R, K] tensor; got {x.dtype} {tuple(x.shape)}")
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8; got {blocks.dtype}, {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} are not "
                         "[E, N, K/32, 16] / [E, N, K/32]")  # fmt: skip
    if x.shape[1] != blocks.shape[2] * BLOCK:
        raise ValueError(f"x has {x.shape[1]} columns but the weights take {blocks.shape[2] * BLOCK}")
    if counts.shape != (blocks.shape[0],) or counts.is_floating_point():
        raise ValueError(f"counts must be integer [E={blocks.shape[0]}]; got {counts.dtype} {tuple(counts.shape)}")
    for name, t in (("blocks", blocks), ("scales", scales), ("counts", counts)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def mxfp4_grouped_matmul_ref(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Reference: dequantize every expert to x's dtype, then the grouped GEMM. Returns [R, N] in x's dtype."""
    check_mxfp4_grouped_inputs(x, blocks, scales, counts)
    return grouped_matmul(x, dequantize_mxfp4(blocks, scales, x.dtype).transpose(1, 2), counts)


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
