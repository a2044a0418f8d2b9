"""Building transformers' GptOssForCausalLM with our weights: the public reference our model must match."""

from __future__ import annotations

import torch

from ossrl.model.gpt_oss import GptOss
from ossrl.model.mxfp4 import MXFP4Weight


def hf_model_from_ours(model: GptOss, dtype: torch.dtype = torch.float32):
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_config = GptOssConfig(**model.config.to_hf_dict())
    hf = GptOssForCausalLM._from_config(hf_config, attn_implementation="eager", torch_dtype=dtype).eval()
    ours = {name: t for name, t in model.state_dict().items() if not name.endswith((".blocks", ".scales"))}
    for name, module in model.named_modules():
        if isinstance(module, MXFP4Weight):
            ours[name] = module.dequantize(torch.float32)
    hf_params = dict(hf.named_parameters())
    assert set(hf_params) == set(ours), set(hf_params) ^ set(ours)
    with torch.no_grad():
        for name, param in hf_params.items():
            value = ours[name]
            if value.shape != param.shape and value.dim() == 3 and value.transpose(1, 2).shape == param.shape:
                value = value.transpose(1, 2)  # some transformers versions store experts [E, out, in]
            param.copy_(value.to(param.dtype))
    return hf
