"""A tiny GptOss with MXFP4 experts and expert LoRA, and its twin with the experts dequantized (dense fp32,
frozen): the pair the MXFP4 training tests compare gradients on."""

from __future__ import annotations

import copy

import torch

from ossrl.model.checkpoint import quantize_experts
from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss
from ossrl.model.lora import LoraConfig, apply_lora, lora_parameters
from ossrl.model.mxfp4 import MXFP4Weight

SHAPES = dict(vocab_size=64, num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
              sliding_window=4)  # fmt: skip


def mxfp4_and_dense(targets: tuple[str, ...]) -> tuple[GptOss, GptOss]:
    """(MXFP4 experts + LoRA on ``targets``, the same with the experts dequantized to dense fp32 and frozen)."""
    torch.manual_seed(0)
    model = GptOss.from_config(GptOssConfig(**SHAPES), dtype=torch.float32, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3 if "sinks" in name or name.endswith("bias") else 0.1)
    quantize_experts(model)
    apply_lora(model, LoraConfig(r=2, alpha=4, targets=targets), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in lora_parameters(model):  # B non-zero, so every LoRA factor gets a gradient
            p.normal_(0, 0.2)
    dense = copy.deepcopy(model)
    for layer in dense.model.layers:
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name).dequantize(torch.float32)
            delattr(experts, name)
            setattr(experts, name, torch.nn.Parameter(weight, requires_grad=False))
    assert isinstance(model.model.layers[0].mlp.experts.down_proj, MXFP4Weight)
    return model, dense
