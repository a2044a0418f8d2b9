"""MXFP4, the format gpt-oss ships its experts in: the numerics in one place (decoding, encoding) and the checks of
the MXFP4 grouped GEMM's inputs, shared by its reference and entry point (``mxfp4_ref``), its Triton kernel
(``mxfp4_triton``, which decodes the same bits in registers) and the model's ``MXFP4Weight``.

An expert matrix W [E, out, in] is stored as ``blocks`` uint8 [E, out, in/32, 16] (32 E2M1 codes per block, two per
byte, LOW nibble first) and ``scales`` uint8 [E, out, in/32] (one E8M0 power of two per block, bias 127): element j
of a block is FP4_VALUES[code_j] * 2**(scale - 127).
"""

from __future__ import annotations

from functools import cache

import torch

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


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dense [..., out, in] -> (blocks [..., out, in/32, 16] uint8, scales [..., out, in/32] uint8).

    Round-to-nearest onto the E2M1 grid with the OCP MX scale choice: 2**(floor(log2(amax)) - 2), so the block's
    largest magnitude lands in [4, 8) and saturates to 6. Used to write MXFP4 test checkpoints.
    """
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of {BLOCK}; got {tuple(weight.shape)}")
    if weight.dim() > 2 and weight.shape[0] > 1:  # one expert at a time: the grid search takes ~40 bytes per value
        parts = [quantize_mxfp4(w) for w in weight]
        return torch.stack([b for b, _ in parts]), torch.stack([s for _, s in parts])
    w = weight.float().reshape(*weight.shape[:-1], weight.shape[-1] // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1, keepdim=True)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - 2, torch.full_like(amax, -127))
    exp = exp.clamp(-127, 127)
    scaled = w / torch.exp2(exp)
    grid = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    codes = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(dim=-1)
    codes = codes | ((scaled < 0) & (codes > 0)).long() << 3
    codes = codes.to(torch.uint8).reshape(*w.shape[:-1], BLOCK // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def check_mxfp4_grouped_inputs(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> None:
    """Clear errors for bad shapes, dtypes and devices (counts' values are not read: that would wait for the GPU)."""
    _check_weights(x, blocks, scales, counts, "x")
    if x.shape[1] != blocks.shape[2] * BLOCK:
        raise ValueError(f"x has {x.shape[1]} columns but the weights take {blocks.shape[2] * BLOCK}")


def check_mxfp4_grouped_dx_inputs(
    grad: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> None:
    """``check_mxfp4_grouped_inputs`` for the input-gradient GEMM: grad is dY [R, N], N the weights' outputs."""
    _check_weights(grad, blocks, scales, counts, "grad")
    if grad.shape[1] != blocks.shape[1]:
        raise ValueError(f"grad has {grad.shape[1]} columns but the weights give {blocks.shape[1]} outputs")


def _check_weights(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor, name: str):
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating [R, K] tensor; got {x.dtype} {tuple(x.shape)}")
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8; got {blocks.dtype}, {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} are not "
                         "[E, N, K/32, 16] / [E, N, K/32]")  # fmt: skip
    if counts.shape != (blocks.shape[0],) or counts.is_floating_point():
        raise ValueError(f"counts must be integer [E={blocks.shape[0]}]; got {counts.dtype} {tuple(counts.shape)}")
    for label, t in (("blocks", blocks), ("scales", scales), ("counts", counts)):
        if t.device != x.device:
            raise ValueError(f"{label} is on {t.device} but {name} is on {x.device}")
