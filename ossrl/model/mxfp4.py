"""MXFP4 expert weights, as gpt-oss ships them (the numerics live in ``ossrl.kernels.mxfp4_format``).

On disk an expert matrix W [E, out, in] is stored as
  ``*_blocks`` uint8 [E, out, in/32, 16]: 32 E2M1 (fp4) values per block, two per byte, LOW nibble first;
  ``*_scales`` uint8 [E, out, in/32]: one E8M0 power-of-two scale per block, exponent bias 127.
The value of element j of a block is FP4_VALUES[nibble_j] * 2**(scale - 127). The model computes with
W^T [E, in, out] (tokens @ weight), so ``dequantize`` returns that layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ossrl.kernels.mxfp4_format import BLOCK, FP4_VALUES, dequantize_mxfp4, quantize_mxfp4

__all__ = ["BLOCK", "FP4_VALUES", "MXFP4Weight", "dequantize_mxfp4", "quantize_mxfp4"]


class MXFP4Weight(nn.Module):
    """An expert weight kept packed in memory (4.25 bits/value), in training too: the MoE's expert GEMMs read
    ``blocks``/``scales`` directly (``ossrl.kernels.mxfp4_ref.mxfp4_grouped_matmul``, differentiable in its input).

    ``dequantize()`` returns W^T [E, in, out], the layout the dense expert GEMMs use (decode's gathered path, large
    no-grad prefills). Frozen: MXFP4 weights are never trained (LoRA adapters train beside them).
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
