"""GPT-OSS model configuration, read from and written to the HF `config.json` form the released checkpoints use."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPES = ("sliding_attention", "full_attention")

# Keys HF writes into config.json that do not change the network we build.
_HF_METADATA_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "hidden_act", "initializer_range", "attention_dropout", "router_aux_loss_coef",
    "output_router_logits", "quantization_config", "experts_per_token", "_name_or_path", "tie_word_embeddings",
    "num_experts", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "_attn_implementation",
    "max_window_layers", "use_sliding_window", "rope_theta", "rope_scaling", "rope_parameters",
    "initial_context_length",
}  # fmt: skip


def _default_rope_scaling() -> dict[str, Any]:
    return {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    }


@dataclass
class GptOssConfig:
    """The numbers that define a GPT-OSS network. Defaults are gpt-oss-20b."""

    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=_default_rope_scaling)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    initializer_range: float = 0.02
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            # gpt-oss alternates, starting with a sliding-window layer.
            self.layer_types = [LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers)]
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"GptOssConfig.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads", f"must be a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (RoPE rotates halves)")
        if self.num_experts_per_tok > self.num_local_experts:
            raise bad("num_experts_per_tok", f"cannot exceed num_local_experts={self.num_local_experts}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad("layer_types", f"needs one entry per layer ({self.num_hidden_layers})")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise bad("layer_types", f"unknown layer types {unknown}; allowed: {list(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and (
            not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise bad("sliding_window", "must be a positive integer when a layer slides")
        if self.rope_theta <= 0:
            raise bad("rope_theta", "must be positive")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("yarn", "default"):
                raise bad("rope_scaling", "rope_type must be 'yarn' or 'default'")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        raise bad("rope_scaling", f"yarn needs {key!r}")
                if self.rope_scaling["factor"] < 1:
                    raise bad("rope_scaling", "yarn factor must be >= 1")
        # Experts are quantized in 32-element blocks along their contraction dims.
        if self.swiglu_limit <= 0:
            raise bad("swiglu_limit", "must be positive")

    @property
    def num_params(self) -> int:
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        hq, hkv, d = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = h * hq * d + hq * d + 2 * (h * hkv * d + hkv * d) + hq * d * h + h + hq
        moe = e * h + e + e * (h * 2 * i + 2 * i + i * h + h)
        per_layer = attn + moe + 2 * h
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * h + h

    # ---- HF config.json ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> GptOssConfig:
        data = dict(data)
        model_type = data.get("model_type", "gpt_oss")
        if model_type != "gpt_oss":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'gpt_oss'")
        known = {f.name for f in dataclasses.fields(cls)}
        # HF v5 moved rope_theta into rope_parameters; v4 and the released checkpoints use rope_theta + rope_scaling.
        rope = data.get("rope_parameters") or data.get("rope_scaling")
        kwargs: dict[str, Any] = {}
        if rope is not None:
            rope = dict(rope)
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope.pop("rope_theta")
            kwargs["rope_scaling"] = None if rope.get("rope_type", rope.get("type")) == "default" else rope
        elif "rope_scaling" in data or "rope_parameters" in data:
            kwargs["rope_scaling"] = None
        if "rope_theta" in data:
            kwargs["rope_theta"] = data["rope_theta"]
        if data.get("tie_word_embeddings"):
            raise ValueError(f"{source}: tie_word_embeddings=true is not GPT-OSS (its lm_head is untied)")
        unknown = sorted(k for k in data if k not in known and k not in _HF_METADATA_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown config fields {unknown}")
        for key in known:
            if key in data and key not in ("rope_theta", "rope_scaling"):
                kwargs[key] = data[key]
        if kwargs.get("sliding_window") is None and "sliding_window" in kwargs:
            kwargs["sliding_window"] = 0
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_json(cls, path: str | Path) -> GptOssConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers' GptOssConfig reads (v4 and v5)."""
        data = dataclasses.asdict(self)
        data.update(
            architectures=["GptOssForCausalLM"],
            model_type="gpt_oss",
            tie_word_embeddings=False,
            hidden_act="silu",
            experts_per_token=self.num_experts_per_tok,
        )
        if self.rope_scaling is None:
            data["rope_scaling"] = {"rope_type": "default"}  # None would mean gpt-oss's yarn to transformers
        return data
