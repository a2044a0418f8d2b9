"""GPT-OSS in plain PyTorch: one implementation for rollouts and training.

Module and parameter names mirror transformers' ``GptOssForCausalLM`` so checkpoints load by name
(``model.layers.0.self_attn.q_proj.weight``, ``model.layers.0.mlp.experts.gate_up_proj``, ...).
Every forward runs on a packed variable-length batch (flat tokens + ``cu_seqlens``); the padded [B, T] call
packs its real tokens, runs the same path and scatters the result back.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ossrl.kernels import linear, rms_norm, sink_attention, softmax
from ossrl.kernels.moe import moe_experts
from ossrl.model.checkpoint import keeps_fp32, load_weights, resolve_checkpoint_dir, write_checkpoint
from ossrl.model.config import GptOssConfig
from ossrl.model.footprint import check_fits
from ossrl.model.mxfp4 import MXFP4Weight
from ossrl.model.offload import ActivationOffload, gather_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))  # kept fp32, as released
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_frequencies(config: GptOssConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the cos/sin scale ("concentration"), with YaRN when configured.

    YaRN (as in gpt-oss): dims rotating fewer than beta_slow times over the original context are interpolated
    (frequency / factor), dims rotating more than beta_fast times are kept, a linear ramp blends in between;
    cos and sin are scaled by 0.1 * ln(factor) + 1.
    """
    d = config.head_dim
    base = config.rope_theta
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    rope = config.rope_scaling
    if rope is None or rope.get("rope_type", rope.get("type")) == "default" or rope["factor"] <= 1.0:
        return 1.0 / freq, 1.0
    factor = float(rope["factor"])
    original = float(rope["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rope.get("beta_fast") or 32.0), float(rope.get("beta_slow") or 1.0)
    concentration = rope.get("attention_factor") or 0.1 * math.log(factor) + 1.0
    d_half = d / 2
    low = d_half * math.log(original / (beta_fast * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(original / (beta_slow * 2 * math.pi)) / math.log(base)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    # transformers clamps the ramp's ends to [0, head_dim - 1]; gpt-oss's own configs never reach the clamp.
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d_half, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * freq)) * (1 - extrapolation_weight) + (1.0 / freq) * extrapolation_weight
    return inv_freq, float(concentration)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation of x [T, H, D] by cos/sin [T, D/2] (fp32 math)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose table may be offloaded (``offloaded``, set by ``ossrl.model.offload``): it then lives on
    the CPU, the batch's rows are gathered there and only they are copied to the ids' device."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.offloaded = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.weight, ids) if self.offloaded else super().forward(ids)


class Linear(nn.Linear):
    """``nn.Linear`` that may carry an unmerged LoRA adapter (set by ``ossrl.model.lora.apply_lora``):
    out = x W^T + b + lora(x). The adapter lives beside the weight, so checkpoint names are unchanged."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_module("lora", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias)
        return out + self.lora(x) if _lora_on(self.lora) else out


def _lora_on(adapter: nn.Module | None) -> bool:
    return adapter is not None and bool(adapter.active)


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32))
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.window = config.sliding_window if sliding else None
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: PackedBatch) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if batch.kv_cache is not None:  # rollout: keys/values go to (and come from) the engine's paged cache
            out = batch.kv_cache.attend(self.layer_idx, q, k, v, self.sinks, self.window)
        else:
            out = sink_attention(q, k, v, self.sinks, batch.cu_seqlens, batch.max_seqlen, window=self.window)
        return self.o_proj(out.reshape(t, -1))


class Router(nn.Module):
    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))
        self.register_module("lora", None)  # optional LoRA on the router's logits (ossrl.model.lora)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their weights: softmax over the k selected logits only."""
        ids, weights, _ = self.route(x)
        return ids, weights

    def route(
        self, x: torch.Tensor, replay: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(experts used [T, k], their weights [T, k], the router's own top-k [T, k]). ``replay`` [T, k] (router
        replay): rows whose entries are all >= 0 use those experts, in that order, instead of the router's choice;
        their weights are the softmax of the CURRENT logits of those experts, so the router still learns."""
        logits = linear(x, self.weight, self.bias)
        if _lora_on(self.lora):
            logits = logits + self.lora(x)
        top_logits, top_ids = torch.topk(logits, self.top_k, dim=-1, sorted=True)
        ids = top_ids
        if replay is not None:
            ids = torch.where((replay >= 0).all(-1, keepdim=True), replay.to(top_ids.dtype), top_ids)
            top_logits = logits.gather(-1, ids)
        return ids, softmax(top_logits.float()).to(x.dtype), top_ids


class Experts(nn.Module):
    """Expert weights in the layout of the HF bf16 checkpoints: gate_up_proj [E, H, 2I], down_proj [E, I, H].
    A weight may instead be an ``MXFP4Weight`` (packed, dequantized for compute). ``gate_up_lora`` / ``down_lora``
    are optional per-expert LoRA adapters (``ossrl.model.lora``), applied inside the grouped expert GEMMs."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj: nn.Parameter | MXFP4Weight = nn.Parameter(torch.zeros(e, h, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj: nn.Parameter | MXFP4Weight = nn.Parameter(torch.zeros(e, i, h))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.register_module("gate_up_lora", None)
        self.register_module("down_lora", None)
        # Tokens per MoE chunk (None: all at once); over long sequences each chunk is checkpointed (``moe_experts``).
        self.chunk_tokens: int | None = None

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        return moe_experts(
            x, expert_ids, expert_weights, self.gate_up_proj, self.gate_up_proj_bias,
            self.down_proj, self.down_proj_bias, alpha=self.alpha, limit=self.limit,
            gate_up_lora=self.gate_up_lora.factors() if _lora_on(self.gate_up_lora) else None,
            down_lora=self.down_lora.factors() if _lora_on(self.down_lora) else None, chunk_tokens=self.chunk_tokens,
        )  # fmt: skip


class MLP(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, batch: PackedBatch | None = None) -> torch.Tensor:
        """``batch.routes`` (router replay) overrides the router's choice; ``batch.route_log`` receives it."""
        replay = batch.routes[:, self.layer_idx] if batch is not None and batch.routes is not None else None
        expert_ids, expert_weights, chosen = self.router.route(x, replay)
        if batch is not None and batch.route_log is not None:
            batch.route_log[self.layer_idx] = chosen
        return self.experts(x, expert_ids, expert_weights)


class DecoderLayer(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer_idx)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: PackedBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch)
        return x + self.mlp(self.post_attention_layernorm(x), batch)


@dataclass
class PackedBatch:
    """A flat batch of sequences: token i belongs to sequence b when cu_seqlens[b] <= i < cu_seqlens[b+1]."""

    input_ids: torch.Tensor  # [T] long
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    position_ids: torch.Tensor  # [T] long, restarting at 0 in every sequence
    scatter_index: torch.Tensor | None = None  # where each packed token sits in the flattened [B*T] input
    padded_shape: tuple[int, int] | None = None
    kv_cache: KVCacheStep | None = None  # set by the rollout engine; None means plain varlen attention
    # Router replay: [T, layers, k] experts each token uses in each layer instead of its router's top-k (a row of -1:
    # the router's own choice). ``route_log``: a list with one slot per layer that each MoE layer fills with the
    # experts its router chose ([T, k] long), replay or not (the engine records routes; the trainer compares).
    routes: torch.Tensor | None = None
    route_log: list[torch.Tensor | None] | None = None


class KVCacheStep(Protocol):
    """What the rollout engine plugs into attention for one forward: store this step's keys/values in its cache
    and attend over everything cached for each sequence."""

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None
    ) -> torch.Tensor: ...


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long(), output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def pack_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> PackedBatch:
    """Normalise the two calling conventions (flat + cu_seqlens, or padded [B, T] + mask) into a PackedBatch."""
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be integer token ids; got {input_ids.dtype}")
    if input_ids.dim() == 1:
        if attention_mask is not None:
            raise ValueError("a flat [T] input takes cu_seqlens, not attention_mask")
        t = input_ids.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, t], dtype=torch.int32, device=input_ids.device)
        cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
        if cu_seqlens.dim() != 1 or cu_seqlens[0].item() != 0 or cu_seqlens[-1].item() != t:
            raise ValueError(f"cu_seqlens must run from 0 to T={t}; got {cu_seqlens.tolist()}")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if (lengths < 0).any():
            raise ValueError(f"cu_seqlens must be non-decreasing; got {cu_seqlens.tolist()}")
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, t)
        return PackedBatch(input_ids.long(), cu_seqlens, int(lengths.max().item()), position_ids.long())
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [T] (packed) or [B, T] (padded); got {tuple(input_ids.shape)}")
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens is for flat [T] inputs; pass attention_mask with [B, T] inputs")
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {(b, t)}")
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = torch.cumsum(lengths, 0)
    scatter_index = mask.reshape(-1).nonzero().squeeze(1)
    if position_ids is None:
        position_ids = (torch.cumsum(mask, dim=1) - 1).clamp_min(0)  # left padding: first real token at 0
    return PackedBatch(
        input_ids.reshape(-1)[scatter_index].long(), cu, int(lengths.max().item()),
        position_ids.reshape(-1)[scatter_index].long(), scatter_index, (b, t),
    )  # fmt: skip


class GptOssBackbone(nn.Module):
    """``model.*`` in the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GptOss(nn.Module):
    """GPT-OSS causal LM.

    ``model(input_ids [B, T], attention_mask=None)`` -> logits [B, T, vocab] (0 at padded positions);
    ``model(input_ids [T], cu_seqlens=...)`` -> logits [T, vocab] for a packed batch.
    """

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GptOssBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)  # (never gets a LoRA)
        self.gradient_checkpointing = False
        # Saved-tensor hooks offloading checkpointed layers' inputs to host memory (``ossrl.model.offload``).
        self.activation_offload: ActivationOffload | None = None

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # (not the embedding's: that table may be offloaded to the CPU)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """Final normed hidden states [T, H] of a packed batch."""
        x = self.model.embed_tokens(batch.input_ids)
        inv_freq, concentration = rope_frequencies(self.config, x.device)
        angles = batch.position_ids.float().unsqueeze(1) * inv_freq
        rope = (angles.cos() * concentration, angles.sin() * concentration)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        # A checkpointed layer saves only its input; with activation offload that input waits in host memory.
        offload = self.activation_offload.hooks() if checkpointed and self.activation_offload else nullcontext()
        with offload:
            for layer in self.model.layers:
                if checkpointed:
                    x = checkpoint(layer, x, rope, batch, use_reentrant=False)
                else:
                    x = layer(x, rope, batch)
        return self.model.norm(x)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        routes: torch.Tensor | None = None,
        route_log: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Final hidden states, shaped like the input ([T, H] packed or [B, T, H] padded). Packed input only:
        ``routes`` [T, layers, k] replays experts (router replay; -1 rows: the router's own), ``route_log`` (a list
        of one None per layer) receives each layer's router choice [T, k]."""
        batch = pack_batch(input_ids, attention_mask, cu_seqlens, position_ids)
        if routes is not None or route_log is not None:
            if batch.padded_shape is not None:
                raise ValueError("routes / route_log need a packed [T] input (with cu_seqlens)")
            if routes is not None and tuple(routes.shape[:2]) != (input_ids.shape[0], self.config.num_hidden_layers):
                raise ValueError(f"routes must be [T={input_ids.shape[0]}, layers={self.config.num_hidden_layers}, "
                                 f"k]; got {tuple(routes.shape)}")  # fmt: skip
            batch.routes, batch.route_log = routes, route_log
        return self.unpack(self.forward_packed(batch), batch)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = pack_batch(input_ids, attention_mask, cu_seqlens, position_ids)
        return self.unpack(self.lm_head(self.forward_packed(batch)), batch)

    @staticmethod
    def unpack(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if batch.padded_shape is None:
            return values
        b, t = batch.padded_shape
        out = values.new_zeros(b * t, values.shape[-1])
        out = out.index_copy(0, batch.scatter_index, values)
        return out.view(b, t, -1)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: GptOssConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        seed: int | None = 0,
    ) -> GptOss:
        """Random weights at the config's shapes, allocated and initialised directly on ``device`` in ``dtype``
        (built on the meta device first, so no fp32 or CPU copy of the weights ever exists)."""
        with torch.device("meta"):
            model = cls(config)
        model.set_dtype(dtype)
        model.to_empty(device=device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator)
        return model

    def set_dtype(self, dtype: torch.dtype) -> GptOss:
        """Cast to ``dtype``, keeping norms and sinks in fp32 (as released) and MXFP4 weights packed."""
        for name, param in self.named_parameters():
            if not keeps_fp32(name):
                param.data = param.data.to(dtype)
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:  # matrices, embeddings, experts, router and sinks
                param.normal_(0.0, std, generator=generator)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        keep_mxfp4: bool = True,
        strict: bool = True,
    ) -> GptOss:
        """Load an HF-format gpt-oss checkpoint (bf16, or MXFP4 experts) from a directory or the Hub. MXFP4 experts
        stay packed (``MXFP4Weight``) unless ``keep_mxfp4=False`` (then dequantized to ``dtype``). Missing tensors are
        an error; unexpected ones too when ``strict`` (else a warning). Reading: ``ossrl.model.checkpoint``."""
        directory = resolve_checkpoint_dir(path_or_hub_id)
        with torch.device("meta"):  # no weights are allocated before the checkpoint's own are read
            model = cls(GptOssConfig.from_json(directory / "config.json"))
        packed = keep_mxfp4 and "quantization_config" in json.loads((directory / "config.json").read_text())
        check_fits(model, dtype, torch.device(device), mxfp4_experts=packed, what=str(path_or_hub_id))
        model.set_dtype(dtype)
        load_weights(model, directory, dtype=dtype, device=device, keep_mxfp4=keep_mxfp4, strict=strict)
        return model

    def save_pretrained(self, path: str | Path, *, mxfp4: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
        """Write an HF-format checkpoint directory (config.json + safetensors, sharded with an index if large)."""
        return write_checkpoint(self, path, mxfp4=mxfp4, max_shard_bytes=max_shard_bytes)
