"""From a rollout to micro-batches: whole sequences of a ``RolloutBatch`` packed under a token budget, and token
lists packed into a ``RolloutBatch`` (demonstrations, ``logprobs_of``). Nothing here pads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ossrl.rollout.batch import RolloutBatch


def pack_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of sequences per micro-batch, greedily in order, each at most ``max_tokens`` tokens (a sequence
    longer than that goes alone)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(lengths):
        if current and size + n > max_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        batches.append(current)
    return batches


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]] | None = None,
    *,
    device: torch.device | str = "cpu",
) -> RolloutBatch:
    """Token lists as a ``RolloutBatch`` (one group per sequence, no sampler log-probs). ``loss_masks`` (one 0/1
    per completion token) defaults to every completion token."""
    if len(prompts) != len(completions) or (loss_masks is not None and len(loss_masks) != len(completions)):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions"
                         + ("" if loss_masks is None else f", {len(loss_masks)} loss masks"))  # fmt: skip
    masks = loss_masks if loss_masks is not None else [[1] * len(c) for c in completions]
    for i, (p, c, m) in enumerate(zip(prompts, completions, masks, strict=True)):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt (the first completion token needs a token before it)")
        if len(m) != len(c):
            raise ValueError(f"sequence {i}: {len(m)} loss-mask entries for {len(c)} completion tokens")
    n = len(prompts)
    lens = torch.tensor([len(p) + len(c) for p, c in zip(prompts, completions, strict=True)], dtype=torch.long)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    tokens = [t for p, c in zip(prompts, completions, strict=True) for t in (*p, *c)]
    mask = [bool(b) for p, m in zip(prompts, masks, strict=True) for b in (*([0] * len(p)), *m)]
    zeros = torch.zeros(n, dtype=torch.long)
    return RolloutBatch(
        tokens=torch.tensor(tokens, dtype=torch.long), cu_seqlens=cu,
        prompt_lens=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        loss_mask=torch.tensor(mask, dtype=torch.bool), sampler_logprobs=torch.zeros(len(tokens)),
        group=torch.arange(n), sample=zeros, finish=zeros, num_tool_calls=zeros, tool_errors=zeros,
        seconds=torch.zeros(n, dtype=torch.float64),
    ).to(device)  # fmt: skip
