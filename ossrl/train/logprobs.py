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

# A chunk's fp32 logits hold at most this many values (64 MiB). The backward of a chunk (its recompute, the softmax,
# the gradients of each) has ~16 matrices of that size alive at its peak: ~1 GiB whatever the vocabulary (gpt-oss's
# 201,088 columns: 83 rows a chunk), where 2,048 rows took 4.6 GiB (measured with ``ossrl memory``).
CHUNK_VALUES = 2**24


def chunk_rows(vocab_size: int) -> int:
    """Rows of one log-prob chunk for a vocabulary of ``vocab_size``: CHUNK_VALUES logits, 16 to 2,048 rows."""
    return max(16, min(2048, CHUNK_VALUES // max(vocab_size, 1)))


def _vocab_size(head: nn.Module) -> int:
    """Output columns of ``head``: its weight's rows, or (a head wrapping another) its first linear layer's."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    return next((m.out_features for m in head.modules() if isinstance(m, nn.Linear)), 0)


def _chunk_logprobs(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    # Without ``entropy_grad`` the entropy is a metric: computed outside autograd, so the chunk's recompute in the
    # backward does not save (and keep until the backward ends) its softmax and logits for a gradient never taken.
    entropy_mode = torch.enable_grad() if entropy_grad and torch.is_grad_enabled() else torch.no_grad()
    if deterministic_enabled():  # the sampler's arithmetic (ossrl.rollout.sampling), bit for bit
        if entropy_grad:
            return batch_invariant.token_logprobs_and_entropy(logits, targets)
        with entropy_mode:
            entropy = batch_invariant.token_logprobs_and_entropy(logits, targets)[1]
        return batch_invariant.token_logprobs(logits, targets), entropy
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    with entropy_mode:
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs * logits).sum(-1)
    return logprobs, entropy


def token_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H] (states that predict ``targets`` [N]) -> (log-probs [N], entropies [N]), both fp32.
    ``chunk_size``: rows per chunk (default ``chunk_rows`` of the head's vocabulary). ``entropy_grad=False``: the
    entropies carry no gradient (a metric), which saves the backward ~2 chunks of fp32 logits per chunk."""
    chunk_size = chunk_size or chunk_rows(_vocab_size(head))
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {targets.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs; got {temperature} (greedy rollouts: use 1.0)")
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_chunk_logprobs, head, h, t, temperature, entropy_grad, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(head, h, t, temperature, entropy_grad)
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
    chunk_size: int | None = None,
    routes: torch.Tensor | None = None,
    route_log: list | None = None,
    entropy_grad: bool = True,
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
    group = getattr(model, "sp_group", None)  # set by ossrl.dist.ulysses.apply_ulysses
    if group is not None:
        return _sequence_parallel_logprobs(model, group, tokens, cu_seqlens, index, temperature=temperature,
                                           chunk_size=chunk_size, routes=routes, route_log=route_log,
                                           entropy_grad=entropy_grad)  # fmt: skip
    if routes is None and route_log is None:
        hidden = model.hidden_states(tokens, cu_seqlens=cu_seqlens)
    else:
        hidden = model.hidden_states(tokens, cu_seqlens=cu_seqlens, routes=routes, route_log=route_log)
    return token_logprobs(model.lm_head, hidden[index - 1], tokens[index], temperature=temperature,
                          chunk_size=chunk_size, entropy_grad=entropy_grad)  # fmt: skip


def _sequence_parallel_logprobs(
    model: nn.Module,
    group,
    tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int | None,
    routes: torch.Tensor | None,
    route_log: list | None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``packed_logprobs`` under Ulysses SP: the model runs on this rank's shard of the tokens, the log-probs of the
    targets its hidden states predict are computed here, and every rank gets all [M], in order (the same values on
    every rank of the group, so the loss after it is unchanged; gradients: ``ossrl.dist.ulysses``)."""
    import torch.distributed as dist

    from ossrl.dist.ulysses import gather_sequence, shard_batch

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = shard_batch(tokens, cu_seqlens, rank=rank, size=size)
    rows = index - 1  # the position whose hidden state predicts each target
    sizes = []
    for r in range(size):
        lo, hi = shard.bounds(r)
        sizes.append(int(((rows >= lo) & (rows < hi)).sum()))
    mine = rows[(rows >= shard.start) & (rows < shard.stop)]
    local_log = None if route_log is None else [None] * len(route_log)
    local_routes = None if routes is None else shard.local(routes, fill=-1)
    hidden = model.hidden_states(shard.input_ids, shard=shard, routes=local_routes, route_log=local_log)
    h = hidden[mine - shard.start]
    lp, entropy = token_logprobs(
        model.lm_head, h, tokens[mine + 1], temperature=temperature, chunk_size=chunk_size, entropy_grad=entropy_grad
    )
    if h.requires_grad and not lp.requires_grad:  # no target here: keep the local graph in the backward, whose
        lp, entropy = lp + h[:, 0].float(), entropy + h[:, 0].float()  # all-to-alls the other ranks wait on
    both = gather_sequence(torch.stack([lp, entropy], dim=1), group, sizes)
    if route_log is not None:
        for layer, chosen in enumerate(local_log):
            route_log[layer] = gather_sequence(chosen, group)[: shard.total]
    return both[:, 0], both[:, 1]


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
