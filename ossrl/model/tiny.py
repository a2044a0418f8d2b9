"""A tiny GPT-OSS (random weights, real architecture) with a Harmony tokenizer, for tests and the CPU demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss

# Bump when the tiny tokenizer or tiny_config changes: caches of tiny checkpoints are keyed by it.
TINY_VERSION = 2


def tiny_config(vocab_size: int, **overrides: Any) -> GptOssConfig:
    """4 layers (sliding, full, sliding, full), hidden 128, 8 experts top-2, YaRN on: every GPT-OSS feature at a size
    that trains on a laptop CPU. Dims are multiples of 32 so the experts can be stored in MXFP4."""
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                      "original_max_position_embeddings": 1024},
    )  # fmt: skip
    settings.update(overrides)
    return GptOssConfig(**settings)


def write_tiny_checkpoint(
    out_dir: str | Path, *, mxfp4: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Path:
    """Write tokenizer + config + weights of a tiny GPT-OSS as an HF directory that ``GptOss.from_pretrained``,
    transformers' ``AutoTokenizer`` and ``GptOssForCausalLM`` all read."""
    from ossrl.harmony.tiny_tokenizer import build_tiny_tokenizer

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(out)
    eos = tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"])
    config = tiny_config(len(tokenizer), eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **overrides)
    model = GptOss.from_config(config, dtype=dtype, seed=seed)
    model.save_pretrained(out, mxfp4=mxfp4)
    return out
