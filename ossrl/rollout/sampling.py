"""Token sampling that depends only on (logits, seed, position): never on the rest of the batch.

Each row draws its randomness from a counter-based hash of (its seed, its position, the token id), and samples by
the Gumbel-max trick, so the same sequence gets the same tokens whether it decodes alone or among 255 others, and
whatever the batch order. The log-prob returned for a sampled token is under the untruncated distribution at the
sampling temperature, log_softmax(logits / T) — what the trainer computes on the same tokens (top-k / top-p / min-p
only decide which tokens may be drawn). Under greedy decoding (T = 0) it is log_softmax(logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ossrl.kernels import batch_invariant, deterministic_enabled

_M1 = -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64: splitmix64 constants (wrapping int64 arithmetic)
_M2 = -7723592293110705685  # 0x94d049bb133111eb
_GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15


@dataclass
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy. ``stop_token_ids=None`` means Harmony's ``<|return|>`` and
    ``<|call|>`` (from the engine's tokenizer, or the model config's eos ids). ``max_new_tokens`` counts the tokens
    the policy samples over all turns; with tools, a completion runs up to ``max_turns`` assistant turns, each tool
    call gets ``tool_timeout_s`` and its result is cut to ``max_tool_tokens`` tokens."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_token_ids: list[int] | None = None
    seed: int = 0
    max_turns: int = 1
    tool_timeout_s: float = 30.0
    max_tool_tokens: int = 512

    def validate(self, vocab_size: int) -> None:
        for name in ("temperature", "top_p", "min_p", "tool_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"SamplingParams.{name} must be a finite number; got {value!r}")
        for name in ("top_k", "max_new_tokens", "seed", "max_turns", "max_tool_tokens"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"SamplingParams.{name} must be an integer; got {getattr(self, name)!r}")
        if self.tool_timeout_s <= 0 or self.max_tool_tokens < 1:
            raise ValueError(f"SamplingParams: tool_timeout_s must be > 0 and max_tool_tokens >= 1; got "
                             f"{self.tool_timeout_s}, {self.max_tool_tokens}")  # fmt: skip
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off); got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1); got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.max_turns < 1:
            raise ValueError(f"SamplingParams.max_turns must be >= 1; got {self.max_turns}")
        bad = [t for t in self.stop_token_ids or [] if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"SamplingParams.stop_token_ids {bad} are not token ids of this model (vocab {vocab_size})"
            )


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (logical shifts emulated with masks)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) float64 [B, V], a pure function of (seed, position, token id) per row."""
    row_key = _mix(_mix(seeds.long() * _GOLDEN + positions.long()))
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.long)
    bits = _mix(row_key.unsqueeze(1) ^ (vocab * _GOLDEN).unsqueeze(0))
    return (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0**-53


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens top-k / top-p (nucleus) / min-p exclude; logits already divided by T."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token ids [B], log-probs [B] under log_softmax(logits / T)). In deterministic mode the
    log-prob is ``batch_invariant.token_logprobs``: the trainer's arithmetic, bit for bit."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, _logprobs(logits, tokens)
    scaled = logits / params.temperature
    allowed = truncate_logits(scaled, params.top_k, params.top_p, params.min_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, logits.shape[-1])))
    tokens = (allowed.double() + gumbel).argmax(dim=-1)
    return tokens, _logprobs(scaled, tokens)


def _logprobs(scaled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    if deterministic_enabled():
        return batch_invariant.token_logprobs(scaled, tokens)
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(1)
