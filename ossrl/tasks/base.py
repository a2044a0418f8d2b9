"""The task interface and the registry.

A task is a dataset (train / eval splits of plain dict rows) + a prompt builder (Harmony developer instructions,
user message, reasoning effort, tool definitions) + reward functions + tools. ``get_task(name, **options)`` builds
one; every task takes the common options of :class:`Task` plus its own (see each task's docstring).

    task = get_task("gsm8k", path="../shared/data/gsm8k/train.jsonl")
    rows = task.rows("train")
    prompt_ids = task.render_prompt(rows[0], tokenizer)          # -> Engine Request(prompt_ids)
    engine.generate(requests, sampling, tools=task.tool_functions)
    out = task.score(rows[:n], completions, tokenizer=tokenizer)  # token ids, engine Completions or parsed ones
    out.total, out.means(), out.metrics()
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ossrl.harmony import REASONING_EFFORTS, Message, ParsedCompletion, Tool, ToolCall, render_conversation
from ossrl.harmony import render_conversation_text as _render_text
from ossrl.tasks.episode import parse_episode
from ossrl.tasks.rewards import Reward, RewardOutput, RewardSet, as_completion


@dataclass
class ToolSpec:
    """A tool: its Harmony definition (JSON-schema parameters, rendered into the developer message) and the Python
    callable that runs it (sync or async), called with the call's JSON arguments as keyword arguments."""

    definition: Tool
    fn: Callable[..., Any]

    @property
    def name(self) -> str:
        return self.definition.name


@dataclass
class Prompt:
    """What the policy sees for one row; ``render`` gives the token ids ending in ``<|start|>assistant``."""

    messages: list[Message]
    instructions: str | None = None
    tools: list[Tool] = field(default_factory=list)
    reasoning_effort: str | None = "low"
    current_date: str | None = None
    system: bool = True

    def _options(self) -> dict[str, Any]:
        return {
            "instructions": self.instructions,
            "tools": self.tools or None,
            "reasoning_effort": self.reasoning_effort,
            "current_date": self.current_date,
            "system": self.system,
        }

    def render(self, tokenizer: Any) -> list[int]:
        return render_conversation(self.messages, tokenizer, **self._options())

    def text(self) -> str:
        return _render_text(self.messages, **self._options())


class Task:
    """Base class. Subclasses set ``name``, implement ``load_split`` and ``user_message`` (or ``messages``),
    ``reward_definitions`` and optionally ``tool_definitions``.

    Common options: ``rewards`` (names, or name -> weight; default: the task's defaults), ``tools`` (names the
    policy may call; default: all the task defines; ``[]`` for none), ``reasoning_effort`` (low/medium/high),
    ``instructions`` (replaces the default developer instructions), ``current_date`` (None keeps prompts
    identical from day to day), ``system_message`` (False leaves Harmony's generated system message out: shorter
    prompts for tiny models), ``normalize_rewards`` (weighted mean over applicable rewards, see rewards.py),
    ``seed`` (for generated data and held-out splits).
    """

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "eval")
    default_instructions: ClassVar[str | None] = None
    default_rewards: ClassVar[tuple[str, ...] | None] = None  # None: all of reward_definitions()
    accuracy_reward: ClassVar[str] = "correct"  # the reward whose mean is the task's accuracy

    def __init__(
        self,
        *,
        rewards: Sequence[str] | Mapping[str, float] | None = None,
        tools: Sequence[str] | None = None,
        reasoning_effort: str | None = "low",
        instructions: str | None = None,
        current_date: str | None = None,
        system_message: bool = True,
        normalize_rewards: bool = True,
        seed: int = 0,
    ) -> None:
        if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"task {self.name}: reasoning_effort={reasoning_effort!r}; "
                             f"expected one of {', '.join(REASONING_EFFORTS)}")  # fmt: skip
        self.reasoning_effort = reasoning_effort
        self.instructions = instructions if instructions is not None else self.default_instructions
        self.current_date = current_date
        self.system_message = system_message
        self.seed = seed
        self.reward_set = RewardSet(self._select_rewards(rewards), normalize=normalize_rewards)
        self.tools = self._select_tools(tools)
        self._rows: dict[str, list[dict[str, Any]]] = {}

    # --- for subclasses -----------------------------------------------------------------------------------------

    def load_split(self, split: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def user_message(self, row: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def messages(self, row: Mapping[str, Any]) -> list[Message]:
        return [Message.user(self.user_message(row))]

    def reward_definitions(self) -> dict[str, Reward]:
        """Every reward this task offers, with its default weight."""
        raise NotImplementedError

    def tool_definitions(self) -> dict[str, ToolSpec]:
        return {}

    # --- the interface --------------------------------------------------------------------------------------------

    def rows(self, split: str) -> list[dict[str, Any]]:
        """The rows of a split (loaded once). Rows are dicts; every key is a column the rewards receive."""
        if split not in self.splits:
            raise ValueError(f"task {self.name} has no split {split!r}; splits: {', '.join(self.splits)}")
        if split not in self._rows:
            self._rows[split] = self.load_split(split)
        return self._rows[split]

    def prompt(self, row: Mapping[str, Any]) -> Prompt:
        return Prompt(
            self.messages(row),
            instructions=self.instructions,
            tools=[t.definition for t in self.tools.values()],
            reasoning_effort=self.reasoning_effort,
            current_date=self.current_date,
            system=self.system_message,
        )

    def render_prompt(self, row: Mapping[str, Any], tokenizer: Any) -> list[int]:
        return self.prompt(row).render(tokenizer)

    @property
    def rewards(self) -> list[Reward]:
        return self.reward_set.rewards

    @property
    def tool_functions(self) -> dict[str, Callable[..., Any]]:
        """name -> callable, the ``tools=`` argument of ``Engine.generate``."""
        return {name: spec.fn for name, spec in self.tools.items()}

    def parse(self, completion: Any, tokenizer: Any | None = None) -> ParsedCompletion:
        """A completion as reward functions see it: token ids and engine Completions (``.token_ids``) are parsed
        as episodes (tool turns included); strings and message lists as in :func:`as_completion`."""
        ids = getattr(completion, "token_ids", None)
        if (
            ids is None
            and isinstance(completion, Sequence)
            and completion
            and all(isinstance(t, int) for t in completion)
        ):
            ids = completion
        if ids is not None:
            if tokenizer is None:
                raise ValueError(f"task {self.name}: completions given as token ids need tokenizer=")
            return parse_episode(ids, tokenizer)
        return as_completion(completion)

    def score(
        self, rows: Sequence[Mapping[str, Any]], completions: Sequence[Any], *, tokenizer: Any = None
    ) -> RewardOutput:
        """Rewards of ``completions[i]`` for ``rows[i]``: the rows' columns go to the reward functions."""
        if len(rows) != len(completions):
            raise ValueError(f"task {self.name}: {len(rows)} rows for {len(completions)} completions")
        parsed = [self.parse(c, tokenizer) for c in completions]
        keys = sorted({k for r in rows for k in r} - {"prompt", "completion"})  # TRL's rule: those are not columns
        clash = [k for k in keys if k in ("prompts", "completions")]
        if clash:
            raise ValueError(f"task {self.name}: a dataset column may not be named {clash[0]!r}")
        columns = {k: [r.get(k) for r in rows] for k in keys}
        return self.reward_set([self.messages(r) for r in rows], parsed, **columns)

    def call_tool(self, call: ToolCall | str, arguments: Mapping[str, Any] | str | None = None) -> str:
        """Run one tool call synchronously (tests, eval without the engine); the result as the model reads it."""
        fn, args, kwargs = self._resolve(call, arguments)
        if inspect.iscoroutinefunction(fn):
            return _as_text(asyncio.run(fn(*args, **kwargs)))
        return _as_text(fn(*args, **kwargs))

    async def acall_tool(self, call: ToolCall | str, arguments: Mapping[str, Any] | str | None = None) -> str:
        fn, args, kwargs = self._resolve(call, arguments)
        if inspect.iscoroutinefunction(fn):
            return _as_text(await fn(*args, **kwargs))
        return _as_text(await asyncio.to_thread(fn, *args, **kwargs))

    # --- internals --------------------------------------------------------------------------------------------------

    def _resolve(self, call: ToolCall | str, arguments: Any) -> tuple[Callable[..., Any], tuple, dict]:
        if isinstance(call, ToolCall):
            name, arguments = call.name, call.arguments if call.arguments is not None else call.raw_arguments
        else:
            name = call.split(".", 1)[1] if call.startswith("functions.") else call
        if name not in self.tools:
            raise ValueError(_unknown("tool", name, self.tools, f"task {self.name} does not define"))
        args, kwargs = ((), dict(arguments)) if isinstance(arguments, Mapping) else ((arguments,), {})
        return self.tools[name].fn, (() if arguments is None else args), kwargs

    def _select_rewards(self, rewards: Sequence[str] | Mapping[str, float] | None) -> list[Reward]:
        defined = self.reward_definitions()
        if rewards is None:
            names = list(self.default_rewards) if self.default_rewards is not None else list(defined)
            weights: Mapping[str, float] = {}
        elif isinstance(rewards, Mapping):
            names, weights = list(rewards), rewards
        elif isinstance(rewards, str):
            raise TypeError(f"task {self.name}: rewards= takes a list of names or a name -> weight mapping, "
                            f"not the string {rewards!r}")  # fmt: skip
        else:
            names, weights = list(rewards), {}
        for n in names:
            if n not in defined:
                raise ValueError(_unknown("reward", n, defined, f"task {self.name} has no"))
        return [Reward(n, defined[n].fn, float(weights.get(n, defined[n].weight))) for n in names]

    def _select_tools(self, tools: Sequence[str] | None) -> dict[str, ToolSpec]:
        defined = self.tool_definitions()
        if tools is None:
            return defined
        if isinstance(tools, str):
            raise TypeError(f"task {self.name}: tools= takes a list of tool names, not the string {tools!r}")
        for n in tools:
            if n not in defined:
                raise ValueError(_unknown("tool", n, defined, f"task {self.name} does not define"))
        return {n: defined[n] for n in tools}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _unknown(kind: str, name: str, known: Mapping[str, Any] | Sequence[str], lead: str) -> str:
    names = sorted(known)
    hint = difflib.get_close_matches(name, names, n=1)
    msg = f"{lead} {kind} {name!r}; " + (f"available: {', '.join(names)}" if names else f"it has no {kind}s")
    return msg + (f" (did you mean {hint[0]!r}?)" if hint else "")


# --- registry ---------------------------------------------------------------------------------------------------

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered by {_TASKS[cls.name].__qualname__}")
    _TASKS[cls.name] = cls
    return cls


def unregister_task(name: str) -> None:
    """Forget the task ``name`` (one registered for a single run, e.g. by ``ossrl.GRPOTrainer``); no-op if unknown."""
    _TASKS.pop(name, None)


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def task_options(name: str) -> list[str]:
    """The keyword options ``get_task(name, ...)`` accepts (the task's own and the common ones)."""
    cls = _task_class(name)
    opts: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in opts:
                opts.append(p.name)
    return opts


def _task_class(name: str) -> type[Task]:
    if not isinstance(name, str) or name not in _TASKS:
        raise ValueError(_unknown("task", str(name), _TASKS, "there is no"))
    return _TASKS[name]


def get_task(name: str, **options: Any) -> Task:
    """Build the task ``name`` with ``options``; unknown names and options raise, listing what exists."""
    cls = _task_class(name)
    known = task_options(name)
    for opt in options:
        if opt not in known:
            raise ValueError(_unknown("option", opt, known, f"task {name} has no"))
    return cls(**options)
