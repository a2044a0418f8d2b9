"""One sample while the engine runs it (the engine and the tool runner both work on it; it knows neither)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ossrl.rollout.kv_cache import SequencePages


@dataclass(eq=False)  # identity: sequences are compared and removed as objects
class RunningSequence:
    """``new`` holds every token after the prompt; ``logprob_index`` has one entry per token of ``new``: for a
    sampled token, its position in the concatenation of the rollout's per-step log-prob tensors (they stay on the
    device until the rollout ends), -1 for a token the engine appended (a tool result)."""

    request: int
    sample: int
    seed: int
    prompt: list[int]
    pages: SequencePages
    max_len: int  # the longest it may grow: what its KV-cache reservation covers
    pending: list[int] = field(default_factory=list)  # to feed next: the prompt, the last sampled token, a tool result
    new: list[int] = field(default_factory=list)
    logprob_index: list[int] = field(default_factory=list)
    route_index: list[int] = field(default_factory=list)  # per position fed so far: row of its experts (router replay)
    turn_start: int = 0  # index in `new` where the current assistant turn begins
    sampled: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    start_time: float = 0.0
    finish: str | None = None
    seconds: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.new)

    def add_sampled(self, token: int, logprob_index: int) -> None:
        self.new.append(token)
        self.logprob_index.append(logprob_index)
        self.sampled += 1

    def append_tool_result(self, tokens: list[int]) -> None:
        """Append ``tokens`` (a tool result and the next assistant header: loss mask 0) and feed them next, after the
        sampled ``<|call|>`` that ended the turn (it was never fed to the model)."""
        call_token = self.new[-1]
        self.new.extend(tokens)
        self.logprob_index.extend([-1] * len(tokens))
        self.pending = [call_token, *tokens]
        self.turn_start = len(self.new)
