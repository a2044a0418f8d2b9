"""MXFP4 expert weights, as gpt-oss ships them.

On disk an expert matrix W [E, out, in] is stored as
  ``*_blocks`` uint8 [E, out, in/32, 16]: 32 E2M1 (fp4) values per block, two per byte, LOW nibble first;
  ``*_scales`` uint8 [E, out, in/32]: one E8M0 power-of-two scale per block, exponent bias 127.
The value of element j of a block is FP4_VALUES[nibble_j] * 2**(scale - 127). The model computes with
W^T [E, in, out] (tokens @ weight), so ``dequantize`` returns that layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ossrl.kernels.mxfp4_ref import BLOCK, FP4_VALUES, dequantize_mxfp4

__all__ = ["BLOCK", "FP4_VALUES", "MXFP4Weight", "dequantize_mxfp4", "quantize_mxfp4"]


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


class MXFP4Weight(nn.Module):
    """An expert weight kept packed in memory (4.25 bits/value) that dequantizes itself for compute.

    ``dequantize()`` returns W^T [E, in, out], the layout the expert GEMMs use. Frozen: MXFP4 weights are never
    trained (LoRA adapters train beside them).
    """

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        if blocks.dim() != 4 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
            raise ValueError(
                f"MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} are not [E,out,G,16]/[E,out,G]"
            )
        self.register_buffer("blocks", blocks)
        self.register_buffer("scales", scales)

    @classmethod
    def from_dense(cls, weight_t: torch.Tensor) -> MXFP4Weight:
        """Quantize a dense W^T [E, in, out]."""
        return cls(*quantize_mxfp4(weight_t.transpose(1, 2)))

    @property
    def shape(self) -> torch.Size:
        e, out, g, _ = self.blocks.shape
        return torch.Size((e, g * BLOCK, out))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16, experts: torch.Tensor | None = None) -> torch.Tensor:
        """W^T [E, in, out]; with ``experts`` (ids [R]) only those, [R, in, out] (repeats allowed)."""
        if experts is None:
            return dequantize_mxfp4(self.blocks, self.scales, dtype).transpose(1, 2)
        return dequantize_mxfp4(self.blocks[experts], self.scales[experts], dtype).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, mxfp4"
