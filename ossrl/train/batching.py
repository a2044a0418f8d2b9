"""Turning rollouts into packed micro-batches and per-token log-probs the losses consume ([B, L] tensors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ossrl.model.gpt_oss import GptOss
from ossrl.train.logprobs import token_logprobs


@dataclass
class Episode:
    """One sampled sequence as the trainer sees it."""

    prompt: list[int]
    completion: list[int]  # sampled tokens and appended tool tokens
    loss_mask: list[int]  # 1 on sampled tokens
    sampler_logprobs: list[float]
    advantage: float = 0.0
    group: int = 0


def pack_micro_batches(episodes: list[Episode], max_tokens: int) -> list[list[int]]:
    """Indices of episodes per micro-batch, greedily in order, each at most ``max_tokens`` tokens (an episode longer
    than that goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, ep in enumerate(episodes):
        n = len(ep.prompt) + len(ep.completion)
        if current and size + n > max_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        batches.append(current)
    return batches


def padded(rows: list[list[float]] | list[list[int]], width: int, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype, device=device)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def episode_logprobs(
    model: GptOss, episodes: list[Episode], temperature: float, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed forward over prompt + completion of each episode: log-probs and entropies of the completion
    tokens, padded to [B, L] (L = longest completion), under log_softmax(logits / temperature)."""
    device = model.device
    seqs = [ep.prompt + ep.completion for ep in episodes]
    lengths = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
    hidden = model.hidden_states(flat, cu_seqlens=cu.to(device))
    rows, targets = [], []
    for start, ep in zip(cu[:-1].tolist(), episodes, strict=True):
        first = start + len(ep.prompt) - 1  # the hidden state that predicts the first completion token
        rows.extend(range(first, first + len(ep.completion)))
        targets.extend(ep.completion)
    index = torch.tensor(rows, dtype=torch.long, device=device)
    lp, ent = token_logprobs(
        model.lm_head, hidden[index], torch.tensor(targets, device=device), temperature=temperature,
        chunk_size=chunk_size,
    )  # fmt: skip
    width = max(len(ep.completion) for ep in episodes)
    out_lp = lp.new_zeros(len(episodes), width)
    out_ent = ent.new_zeros(len(episodes), width)
    row_of = torch.repeat_interleave(
        torch.arange(len(episodes), device=device), torch.tensor([len(ep.completion) for ep in episodes], device=device)
    )
    col_of = torch.cat([torch.arange(len(ep.completion), device=device) for ep in episodes])
    out_lp = out_lp.index_put((row_of, col_of), lp)
    out_ent = out_ent.index_put((row_of, col_of), ent)
    return out_lp, out_ent
