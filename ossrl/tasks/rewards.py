"""Reward functions and how several of them combine.

A reward function has TRL's shape: ``fn(prompts, completions, **columns) -> list[float | None]``. ``completions`` are
:class:`~ossrl.harmony.ParsedCompletion` (``.final_text`` is the answer, ``.messages`` the whole episode, ``.ok`` and
``.problems`` say whether the Harmony was well formed); each dataset column arrives as a keyword list, one value per
sample, so a function takes what it needs and ``**_`` for the rest (as in TRL, columns named ``prompt`` and
``completion`` are not passed: they are what ``prompts`` and ``completions`` hold). ``None`` means "does not apply to
this sample".

:class:`RewardSet` calls each function and combines them. The rules:

- ``total[i]`` is the weighted mean of the rewards that apply to sample ``i``:
  ``sum(w_j * r_ij) / sum(|w_j|)`` over the rewards ``j`` whose value is not None. A reward that does not apply is left
  out of both sums, so it neither helps nor hurts; with no applicable reward the total is 0.0. ``normalize=False``
  gives TRL's plain weighted sum instead (None counts as 0). A weight-0 reward is computed and logged, never paid.
- Each reward's mean is over the samples where it applies (``RewardOutput.means``), so it can be logged apart.
- A function that raises, or returns a non-finite value, for one sample gives that sample 0.0 (not None: a crash
  must not look like "not applicable") and is logged once per reward and error type, with the sample. A batch
  call that raises is retried one sample at a time to find the culprit. A wrong-length or non-numeric return is a
  bug in the function, not in the sample: it raises.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ossrl.harmony import Message, ParsedCompletion, messages_from_chat

log = logging.getLogger("ossrl.tasks")


class RewardFn(Protocol):
    def __call__(
        self, prompts: list[Any], completions: list[ParsedCompletion], **columns: list[Any]
    ) -> list[float | None]: ...


def as_completion(value: Any) -> ParsedCompletion:
    """Accept a ParsedCompletion, a plain string (taken as the final answer, TRL's "standard" format), a list of
    Harmony messages, or a list of chat dicts (TRL's "conversational" format)."""
    if isinstance(value, ParsedCompletion):
        return value
    if isinstance(value, str):
        return ParsedCompletion(messages=[Message.final(value)], ended="return")
    if isinstance(value, Sequence) and all(isinstance(m, Message) for m in value):
        return ParsedCompletion(messages=list(value), ended="return" if value else "truncated")
    if isinstance(value, Sequence) and all(isinstance(m, Mapping) for m in value):
        return ParsedCompletion(messages=messages_from_chat(value), ended="return" if value else "truncated")
    raise TypeError(
        f"a completion must be a ParsedCompletion, a string, or a list of messages; got {type(value).__name__} "
        "(token ids need a tokenizer: use Task.score(..., tokenizer=tok) or ossrl.tasks.parse_episode)"
    )


def final_text(completion: ParsedCompletion) -> str:
    """The final-channel answer, or "" when there is none (truncated, no final message)."""
    return completion.final_text or ""


def tool_calls(completion: ParsedCompletion) -> list[Message]:
    """The tool calls the assistant made in the episode, in order."""
    return [m for m in completion.messages if m.role == "assistant" and m.recipient]


def per_sample(fn: Callable[..., float | None] | None = None, *, workers: int = 1) -> Any:
    """Turn ``fn(prompt, completion, **row) -> float | None`` into a batch reward function.

    RewardSet calls the per-sample function directly (``.single``), so a failure costs one sample and nothing is
    computed twice. ``workers > 1`` scores samples in threads (rewards that wait on subprocesses, e.g. the sandbox).
    """

    def wrap(single: Callable[..., float | None]) -> Callable[..., list[float | None]]:
        @functools.wraps(single)
        def batch(prompts: list[Any], completions: list[ParsedCompletion], **columns: list[Any]) -> list[float | None]:
            rows = _rows(len(completions), columns)
            args = [(p, c, r) for p, c, r in zip(prompts, completions, rows, strict=True)]
            return _map(lambda a: single(a[0], a[1], **a[2]), args, workers)

        batch.single = single  # type: ignore[attr-defined]
        batch.workers = workers  # type: ignore[attr-defined]
        return batch

    return wrap(fn) if fn is not None else wrap


def _rows(n: int, columns: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"column {name!r} has {len(col)} values for {n} completions")
    return [{k: col[i] for k, col in columns.items()} for i in range(n)]


def _map(fn: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="ossrl-reward") as pool:
        return list(pool.map(fn, items))


@dataclass
class Reward:
    """A named reward function and its weight in the total."""

    name: str
    fn: RewardFn
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"reward {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.weight, int | float) or not math.isfinite(self.weight):
            raise ValueError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")


@dataclass
class RewardOutput:
    """``total``: one float per sample. ``values``: each reward's raw values (None: not applicable). ``errors``:
    per reward, how many samples raised (they count as 0.0 in ``values``)."""

    total: list[float]
    values: dict[str, list[float | None]]
    weights: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)
    error_messages: dict[str, str] = field(default_factory=dict)  # per reward, its last error of this call

    def means(self) -> dict[str, float | None]:
        """Each reward's mean over the samples where it applies (None if it applied to none)."""
        out: dict[str, float | None] = {}
        for name, vals in self.values.items():
            applied = [v for v in vals if v is not None]
            out[name] = sum(applied) / len(applied) if applied else None
        return out

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Flat metrics for a logger: ``reward``, ``reward/std``, ``reward/NAME``, ``reward/NAME/errors``."""
        n = len(self.total)
        mean = sum(self.total) / n if n else 0.0
        out = {prefix: mean, f"{prefix}/std": math.sqrt(sum((t - mean) ** 2 for t in self.total) / n) if n else 0.0}
        for name, value in self.means().items():
            if value is not None:
                out[f"{prefix}/{name}"] = value
            if self.errors.get(name):
                out[f"{prefix}/{name}/errors"] = float(self.errors[name])
        return out


class RewardSet:
    """Several rewards combined with weights (see the module docstring for the rules)."""

    def __init__(self, rewards: Sequence[Reward], *, normalize: bool = True) -> None:
        names = [r.name for r in rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward names must be unique; repeated: {dupes}")
        if not rewards:
            raise ValueError("a RewardSet needs at least one reward")
        self.rewards = list(rewards)
        self.normalize = normalize
        self._logged: set[tuple[str, str]] = set()
        self._messages: dict[str, str] = {}

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: float(r.weight) for r in self.rewards}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Sequence[Any]) -> RewardOutput:
        comps = [as_completion(c) for c in completions]
        prompts = list(prompts)
        if len(prompts) != len(comps):
            raise ValueError(f"{len(prompts)} prompts for {len(comps)} completions")
        cols = {k: list(v) for k, v in columns.items() if k not in ("prompt", "completion")}
        _rows(len(comps), cols)  # checks the lengths
        values: dict[str, list[float | None]] = {}
        errors: dict[str, int] = {}
        self._messages = {}
        for reward in self.rewards:
            values[reward.name], errors[reward.name] = self._run(reward, prompts, comps, cols)
        return RewardOutput(self._combine(values, len(comps)), values, self.weights, errors, self._messages)

    def _combine(self, values: dict[str, list[float | None]], n: int) -> list[float]:
        total = []
        for i in range(n):
            num = den = 0.0
            for reward in self.rewards:
                v = values[reward.name][i]
                if v is not None:
                    num += reward.weight * v
                    den += abs(reward.weight)
            total.append(num / den if self.normalize and den > 0 else num)
        return total

    def _run(
        self, reward: Reward, prompts: list[Any], comps: list[ParsedCompletion], cols: dict[str, list[Any]]
    ) -> tuple[list[float | None], int]:
        n = len(comps)
        single = getattr(reward.fn, "single", None)
        if single is not None:  # a per-sample function: called sample by sample, each failure isolated
            rows = _rows(n, cols)
            calls = [functools.partial(single, prompts[i], comps[i], **rows[i]) for i in range(n)]
            raw = _map(lambda i: self._guard(reward, calls[i], prompts[i], comps[i]), list(range(n)),
                       getattr(reward.fn, "workers", 1))  # fmt: skip
        else:
            try:
                batch = _check_batch(reward, reward.fn(prompts, comps, **cols), n)
                raw = [self._guard(reward, lambda v=v: v, prompts[i], comps[i]) for i, v in enumerate(batch)]
            except _BatchError:
                raise
            except Exception:  # noqa: BLE001 (some sample made the batch fail: retry one at a time to find it)

                def one(i: int) -> Any:
                    out = reward.fn([prompts[i]], [comps[i]], **{k: [v[i]] for k, v in cols.items()})
                    return _check_batch(reward, out, 1)[0]

                raw = [self._guard(reward, functools.partial(one, i), prompts[i], comps[i]) for i in range(n)]
        n_errors = sum(v is _FAILED for v in raw)
        return [0.0 if v is _FAILED else v for v in raw], n_errors

    def _guard(self, reward: Reward, call: Callable[[], Any], prompt: Any, completion: ParsedCompletion) -> Any:
        """The checked value of ``call()``, or _FAILED (logged) when it raises or is not finite."""
        try:
            return _check_value(reward, call())
        except _BatchError:
            raise
        except Exception as err:  # noqa: BLE001 (one sample's failure must not stop the batch)
            self._log(reward, err, prompt, completion)
            return _FAILED

    def _log(self, reward: Reward, err: Exception, prompt: Any, completion: ParsedCompletion) -> None:
        self._messages[reward.name] = f"{type(err).__name__}: {err}"
        key = (reward.name, type(err).__name__)
        if key in self._logged:
            return
        self._logged.add(key)
        log.warning(
            "reward %r raised %s: %s -- the sample scores 0 (logged once per reward and error type)\n"
            "  prompt: %s\n  completion: %s",
            reward.name, type(err).__name__, err, _preview(prompt), _preview(completion),
        )  # fmt: skip


_FAILED: Any = object()


class _BatchError(ValueError):
    """The function's return value is malformed for the whole batch (a bug in it, not a bad sample)."""


def _check_batch(reward: Reward, out: Any, n: int) -> list[Any]:
    if not isinstance(out, list | tuple):
        raise _BatchError(f"reward {reward.name!r} returned {type(out).__name__}; expected a list of {n} values")
    if len(out) != n:
        raise _BatchError(f"reward {reward.name!r} returned {len(out)} values for {n} completions")
    return list(out)


def _check_value(reward: Reward, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool | int | float):
        if not math.isfinite(v):
            raise ValueError(f"non-finite reward {v!r}")
        return float(v)
    raise _BatchError(f"reward {reward.name!r} returned {type(v).__name__} {v!r}; a value must be a number or None")


def _preview(x: Any, limit: int = 300) -> str:
    if isinstance(x, ParsedCompletion):
        text = x.final_text if x.final_text is not None else f"<no final answer; ended={x.ended}>"
        text += f" [problems: {x.error}]" if x.problems else ""
    elif isinstance(x, Sequence) and x and isinstance(x[-1], Message):
        text = x[-1].content
    else:
        text = str(x)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
