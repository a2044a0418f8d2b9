"""Per-token log-probs and entropies from hidden states, a chunk of tokens at a time.

The full [tokens, vocab] fp32 logits (201,088 columns for gpt-oss: 0.8 MB per token) are never materialized:
each chunk's logits are computed, reduced to a log-prob and an entropy, and dropped; under autograd the chunk is
recomputed in the backward (activation checkpointing), so peak memory is one chunk of logits either way.
Log-probs are taken at the sampling temperature, log_softmax(logits / T), as the rollout engine reports them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ossrl.kernels import batch_invariant, deterministic_enabled
from ossrl.train.batching import pack_sequences


def _chunk_logprobs(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    if deterministic_enabled():  # the sampler's arithmetic (ossrl.rollout.sampling), bit for bit
        return batch_invariant.token_logprobs_and_entropy(logits, targets)
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)
    return logprobs, entropy


def token_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H] (states that predict ``targets`` [N]) -> (log-probs [N], entropies [N]), both fp32."""
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {targets.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs; got {temperature} (greedy rollouts: use 1.0)")
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_chunk_logprobs, head, h, t, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(head, h, t, temperature)
        logprobs.append(lp)
        entropies.append(ent)
    if not logprobs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logprobs), torch.cat(entropies)


def packed_logprobs(
    model: nn.Module,
    tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    routes: torch.Tensor | None = None,
    route_log: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed forward over ``tokens`` [T] (sequences at ``cu_seqlens``); log-probs and entropies [M] of the
    tokens where ``targets`` [T] (bool) is set, in order. A target may not be the first token of its sequence.
    ``routes`` [T, layers, k] (router replay) and ``route_log`` go to the model (``GptOss.hidden_states``)."""
    if targets.shape != tokens.shape or targets.dtype != torch.bool:
        raise ValueError(f"targets must be a bool [T] tensor like tokens {tuple(tokens.shape)}; got "
                         f"{targets.dtype} {tuple(targets.shape)}")  # fmt: skip
    starts = torch.zeros_like(targets)
    starts[cu_seqlens[:-1].long()[cu_seqlens.diff() > 0]] = True
    if bool((targets & starts).any()):
        raise ValueError("a target token is the first of its sequence: nothing predicts it")
    index = targets.nonzero().squeeze(1)
    if routes is None and route_log is None:
        hidden = model.hidden_states(tokens, cu_seqlens=cu_seqlens)
    else:
        hidden = model.hidden_states(tokens, cu_seqlens=cu_seqlens, routes=routes, route_log=route_log)
    return token_logprobs(model.lm_head, hidden[index - 1], tokens[index], temperature=temperature,
                          chunk_size=chunk_size)  # fmt: skip


def logprobs_of(
    model: nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """The trainer's log-probs of each completion's tokens given its prompt: one fp32 tensor per completion, from
    the same packed forward the loss uses (log_softmax(logits / temperature)). Runs under the caller's grad mode."""
    batch = pack_sequences(prompts, completions, device=model.device)
    lp, _ = packed_logprobs(model, batch.tokens, batch.cu_seqlens, batch.loss_mask, temperature=temperature)
    return list(lp.split([len(c) for c in completions]))
