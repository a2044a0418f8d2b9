"""The engine -> trainer boundary: one rollout as a batch of packed tensors.

N sequences (prompt followed by completion) are laid end to end in ``tokens`` [T]; sequence i is
``tokens[cu_seqlens[i] : cu_seqlens[i + 1]]`` and its first ``prompt_lens[i]`` tokens are the prompt. Per-token
fields have the shape of ``tokens``: ``loss_mask`` (True on tokens the policy sampled; False on the prompt and on
tool results the engine appended) and ``sampler_logprobs`` (the sampler's log_softmax(logits / T) of each sampled
token, 0 elsewhere). ``token_fields`` holds further per-token tensors ([T, ...]) a producer may add. Per-sequence
fields are [N]: ``group`` (sequences with the same id are samples of one prompt: the GRPO group), ``sample``,
``finish`` (an index into ``FINISH_REASONS``), ``num_tool_calls``, ``tool_errors``, ``seconds``; ``errors`` holds
the reason of each ``finish == "error"`` sequence (None elsewhere).

The trainer never goes back to Python lists for the loss: it selects sequences (``select``), packs them into
micro-batches of whole sequences, and runs one packed forward per micro-batch over ``tokens`` / ``cu_seqlens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

FINISH_REASONS = ("stop", "length", "tool_call", "error")
ERROR = FINISH_REASONS.index("error")


@dataclass
class Completion:
    """One sample, as Python lists (``Engine.generate``'s result; the trainer uses the ``RolloutBatch``).
    ``token_ids`` are all tokens after the prompt: sampled ones (``loss_mask`` 1) and, in multi-turn episodes,
    tool-result tokens the engine appended (``loss_mask`` 0). ``logprobs`` has one float per token: the sampler's
    log-prob, log_softmax(logits / T), for sampled tokens, and 0.0 for appended ones."""

    token_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    finish_reason: str
    num_tool_calls: int = 0
    tool_errors: int = 0
    error: str | None = None
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def sampled_ids(self) -> list[int]:
        return [t for t, m in zip(self.token_ids, self.loss_mask, strict=True) if m]


@dataclass
class RolloutBatch:
    tokens: torch.Tensor  # [T] long
    cu_seqlens: torch.Tensor  # [N + 1] int32, on tokens' device
    prompt_lens: torch.Tensor  # [N] long
    loss_mask: torch.Tensor  # [T] bool
    sampler_logprobs: torch.Tensor  # [T] float32
    group: torch.Tensor  # [N] long
    sample: torch.Tensor  # [N] long
    finish: torch.Tensor  # [N] long, index into FINISH_REASONS
    num_tool_calls: torch.Tensor  # [N] long
    tool_errors: torch.Tensor  # [N] long
    seconds: torch.Tensor  # [N] float64: wall time from admission to finish
    errors: list[str | None] = field(default_factory=list)
    token_fields: dict[str, torch.Tensor] = field(default_factory=dict)

    PER_SEQUENCE = ("prompt_lens", "group", "sample", "finish", "num_tool_calls", "tool_errors", "seconds")
    PER_TOKEN = ("tokens", "loss_mask", "sampler_logprobs")

    def __post_init__(self) -> None:
        n, t = self.cu_seqlens.numel() - 1, self.tokens.numel()
        if n < 0 or self.tokens.dim() != 1:
            raise ValueError(f"RolloutBatch: tokens must be [T] and cu_seqlens [N + 1]; got "
                             f"{tuple(self.tokens.shape)}, {tuple(self.cu_seqlens.shape)}")  # fmt: skip
        for name in self.PER_SEQUENCE:
            if getattr(self, name).shape != (n,):
                raise ValueError(f"RolloutBatch.{name} must be [{n}]; got {tuple(getattr(self, name).shape)}")
        for name in self.PER_TOKEN:
            if getattr(self, name).shape != (t,):
                raise ValueError(f"RolloutBatch.{name} must be [{t}]; got {tuple(getattr(self, name).shape)}")
        for name, value in self.token_fields.items():
            if value.shape[:1] != (t,):
                raise ValueError(f"RolloutBatch.token_fields[{name!r}] must start with [{t}]; got {tuple(value.shape)}")
        if not self.errors:
            self.errors = [None] * n
        if len(self.errors) != n:
            raise ValueError(f"RolloutBatch.errors must have {n} entries; got {len(self.errors)}")

    # ---- shape ---------------------------------------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def seq_lens(self) -> torch.Tensor:
        """[N] long: prompt + completion length of each sequence."""
        return self.cu_seqlens.diff().long()

    @property
    def completion_lens(self) -> torch.Tensor:
        """[N] long: tokens after the prompt (sampled and appended)."""
        return self.seq_lens - self.prompt_lens

    @property
    def sampled_lens(self) -> torch.Tensor:
        """[N] long: tokens the policy sampled (the loss mask's count per sequence)."""
        return torch.zeros(self.num_seqs, dtype=torch.long, device=self.device).index_add_(
            0, self.seq_index, self.loss_mask.long()
        )

    @property
    def seq_index(self) -> torch.Tensor:
        """[T] long: the sequence each token belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=self.device), self.seq_lens)

    @property
    def finish_reasons(self) -> list[str]:
        return [FINISH_REASONS[i] for i in self.finish.tolist()]

    # ---- host views (for reward functions, parsers, printing) --------------------------------------------------
    def prompt_ids(self) -> list[list[int]]:
        return [s[:p] for s, p in zip(self._split(self.tokens), self.prompt_lens.tolist(), strict=True)]

    def completion_ids(self) -> list[list[int]]:
        return [s[p:] for s, p in zip(self._split(self.tokens), self.prompt_lens.tolist(), strict=True)]

    def _split(self, values: torch.Tensor) -> list[list]:
        flat, bounds = values.tolist(), self.cu_seqlens.tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def completions(self) -> list[list[Completion]]:
        """Per group (in order of first appearance), its sequences as ``Completion``s ordered by ``sample``."""
        ids, lps = self._split(self.tokens), self._split(self.sampler_logprobs)
        masks, prompt_lens = self._split(self.loss_mask.int()), self.prompt_lens.tolist()
        finish, calls, tool_errors = self.finish.tolist(), self.num_tool_calls.tolist(), self.tool_errors.tolist()
        sampled, seconds = self.sampled_lens.tolist(), self.seconds.tolist()
        groups: dict[int, list[tuple[int, Completion]]] = {}
        for i, (g, j) in enumerate(zip(self.group.tolist(), self.sample.tolist(), strict=True)):
            p = prompt_lens[i]
            c = Completion(ids[i][p:], lps[i][p:], masks[i][p:], FINISH_REASONS[finish[i]], calls[i], tool_errors[i],
                           self.errors[i], {"seconds": seconds[i], "sampled_tokens": sampled[i]})  # fmt: skip
            groups.setdefault(g, []).append((j, c))
        return [[c for _, c in sorted(group, key=lambda x: x[0])] for group in groups.values()]

    # ---- selecting and joining ---------------------------------------------------------------------------------
    def select(self, index: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """The sequences ``index`` (in that order), repacked."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        starts, lens = self.cu_seqlens[:-1].long().cpu()[idx], self.seq_lens.cpu()[idx]
        token_idx = _ranges(starts, lens).to(self.device)
        cu = torch.zeros(idx.numel() + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        dev_idx = idx.to(self.device)
        per_token = {name: getattr(self, name)[token_idx] for name in self.PER_TOKEN}
        per_seq = {name: getattr(self, name)[dev_idx] for name in self.PER_SEQUENCE}
        return RolloutBatch(cu_seqlens=cu.to(self.device), **per_token, **per_seq,
                            errors=[self.errors[i] for i in idx.tolist()],
                            token_fields={k: v[token_idx] for k, v in self.token_fields.items()})  # fmt: skip

    @staticmethod
    def cat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Batches one after the other; group ids of later batches are shifted so groups never merge."""
        if not batches:
            raise ValueError("RolloutBatch.cat needs at least one batch")
        groups, offset = [], 0
        for b in batches:
            groups.append(b.group + offset)
            offset += int(b.group.max()) + 1 if b.num_seqs else 0
        lens = torch.cat([b.seq_lens for b in batches])
        cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=lens.device)
        cu[1:] = lens.cumsum(0)
        names = set(batches[0].token_fields)
        if any(set(b.token_fields) != names for b in batches):
            raise ValueError("RolloutBatch.cat: the batches carry different token_fields")
        return RolloutBatch(
            cu_seqlens=cu, group=torch.cat(groups),
            **{n: torch.cat([getattr(b, n) for b in batches]) for n in RolloutBatch.PER_TOKEN},
            **{n: torch.cat([getattr(b, n) for b in batches]) for n in RolloutBatch.PER_SEQUENCE if n != "group"},
            errors=[e for b in batches for e in b.errors],
            token_fields={k: torch.cat([b.token_fields[k] for b in batches]) for k in names},
        )  # fmt: skip

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name not in
                 ("errors", "token_fields")}  # fmt: skip
        return replace(self, **moved, token_fields={k: v.to(device) for k, v in self.token_fields.items()})


def _ranges(starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Concatenated aranges [starts[i], starts[i] + lens[i]) without a Python loop."""
    if lens.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    offsets = torch.repeat_interleave(starts - torch.cat([lens.new_zeros(1), lens.cumsum(0)[:-1]]), lens)
    return torch.arange(int(lens.sum())) + offsets
