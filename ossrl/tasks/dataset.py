"""``dataset``: your own task: a dataset with a prompt column, TRL-style reward functions, optional Python tools.

    task:
      name: dataset
      options:
        path: data.jsonl                    # .jsonl/.json/.csv/.parquet file, a folder of them, or a Hub dataset id
        prompt_column: prompt               # each value a string (one user message) or a list of chat messages
        rewards: [my_rewards:correct, my_rewards:short]   # module:function, the working directory first
        reward_weights: [1.0, 0.2]          # one per reward (default 1 each)
        system: Answer with a number only.  # developer instructions (the "system prompt")
        tools: [my_tools:lookup]            # plain Python functions become Harmony tools

    get_task("dataset", path=rows_or_dataset, rewards=[correct, "my_rewards:short"], system="...")

Data. ``path`` is a local file (.jsonl: one JSON object a line; .json: a list of objects; .csv with a header row;
.parquet), a folder of such files whose names say their split (``train.jsonl``, ``test.jsonl``,
``data/train-0.parquet``: the Hugging Face Hub's rules), a Hub dataset id (``subset`` is the Hub's config name), or in
Python a list of dicts, a ``datasets.Dataset``, a ``DatasetDict`` or a pandas DataFrame. ``split`` is the training
split (a single file or a list is all "train"). ``eval_split`` is the held-out split: a split name, another file, or
in Python rows/a Dataset; equal to ``split``, it evaluates on the training rows. Without it, a seeded ``eval_size``
rows of the training split are held out (default min(100, 5% rounded up); at least one row is left to train on).
``limit`` keeps the first N rows of each split. Local paths and modules are relative to the directory you run from. A
file that is not valid UTF-8, a line that is not JSON, a CSV row with the wrong number of fields fail, naming the file
and the line; rows whose prompt is missing, empty or not a chat are skipped (counted and logged, as every task does).
The data is read when the task is built, so a bad file fails before any model loads.

Prompts. A string is one user message. A list of chat messages (``{"role": "system" | "developer" | "user" |
"assistant" | "tool", "content": ...}``) renders as Harmony (``ossrl.harmony.messages_from_chat``); its leading
system/developer message is the developer instructions of that row and wins over ``system``. ``system`` (or the common
``instructions``) gives the developer instructions of every other row; ``system_message: false`` leaves Harmony's
generated system message (model identity, reasoning effort, channels) out.

What reward functions receive, by keyword, as TRL's GRPOTrainer passes them (a function names what it needs and takes
``**kwargs`` for the rest; without ``**kwargs`` it gets only the arguments it names):

- ``prompts``: the prompt column's values as the dataset holds them (strings, or lists of chat dicts);
- ``completions``: the policy's final answer as a string: the content of the final-channel message that ended the
  episode with ``<|return|>``. Nothing else the policy wrote: not its analysis (chain of thought), not tool calls, not
  an earlier final message followed by more text. An episode that did not end in a final answer (cut off by
  ``rollout.max_new_tokens``, out of tool turns, malformed) gives ``""``, so writing an answer in the analysis and
  never finishing earns nothing from a reward that reads ``completions``;
- ``completion_ids``: every token id after the prompt (list[int]; with tools, the tool results the engine appended
  too): parse them with ``ossrl.tasks.parse_episode(ids, tokenizer)`` to see the whole episode. ``None`` when scoring
  text given directly (``task.score(rows, ["42"])``);
- every other column of the dataset as a keyword list aligned with ``completions`` (TRL's rule: columns named
  ``prompt`` and ``completion`` are not passed; a prompt column of another name is passed under its own name too).

They return one float or None ("does not apply to this sample") per completion; numpy/torch values are accepted. The
total is the weighted mean of the rewards that apply (``normalize_rewards: false``: TRL's weighted sum); a function
that raises scores those samples 0 and is logged (see ``ossrl.tasks.rewards``). A reward's name is its function's name
(``name_2`` for a repeated one); the task's accuracy is the reward named ``correct`` if there is one, else the first.
A ``module:function`` that cannot be imported, or a function that needs an argument no column supplies, fails when the
task is built, naming what was looked for and where.

Tools. Each function's parameters must carry type hints (str, int, float, bool, list[...], dict, Literal[...], X | None
for optional); parameters without a default are required. The first line of its docstring is the tool's description;
a Google-style ``Args:`` section describes the parameters. The policy's JSON arguments are passed as keywords; what
the function returns (str, or anything JSON-serializable) is what the model reads.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ossrl.harmony import Message, ParsedCompletion, messages_from_chat
from ossrl.tasks.base import Prompt, Task, ToolSpec, register_task, unregister_task
from ossrl.tasks.data import BadRow, clean_rows
from ossrl.tasks.functions import load_function, tool_from_function
from ossrl.tasks.rewards import Reward, RewardOutput
from ossrl.tasks.sources import FILE_SUFFIXES, DatasetFileError, _in_memory_rows, load_source, read_data_file

log = logging.getLogger("ossrl.tasks")

REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids")  # what every reward gets besides the columns
NOT_COLUMNS = ("prompt", "completion")  # TRL: these columns are what prompts/completions hold, never passed again
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def answer_text(completion: ParsedCompletion) -> str:
    """What a reward sees as the completion: the final-channel message that ended the episode with ``<|return|>``,
    or "" when the episode did not end in a final answer (see the module docstring)."""
    if completion.ended != "return" or not completion.messages:
        return ""
    last = completion.messages[-1]
    if last.role != "assistant" or last.channel != "final" or last.recipient is not None:
        return ""
    return last.content


class TrlReward:
    """A TRL-style reward function, called with what it asks for: ``prompts``, ``completions`` (final answers as
    strings), ``completion_ids`` and the dataset's columns, by keyword."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name = fn, name
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: give it everything
            params = []
            self.takes_all = True
        else:
            self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        positional = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
        if positional:
            raise ValueError(f"reward {name!r}: arguments are passed by keyword (prompts=, completions=, ...); "
                             f"{positional} are positional-only")  # fmt: skip
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.accepts = {p.name for p in named}
        self.required = [p.name for p in named if p.default is p.empty]

    def check(self, columns: Sequence[str], where: str = "the data") -> None:
        """Every argument the function needs is one it will get."""
        supplied = set(REWARD_ARGUMENTS) | set(columns)
        missing = [n for n in self.required if n not in supplied]
        if missing:
            raise ValueError(
                f"reward {self.name!r} needs argument(s) {missing} that no column of {where} supplies; it gets "
                f"{', '.join(REWARD_ARGUMENTS)} and the columns: {', '.join(columns) or '(none)'}"
            )

    def __call__(
        self, prompts: list[Any], completions: list[ParsedCompletion], *, completion_ids: Any = None, **columns: Any
    ) -> list[Any]:
        n = len(completions)
        ids = list(completion_ids) if completion_ids is not None else [None] * n
        kwargs = {
            "prompts": copy.deepcopy(list(prompts)),
            "completions": [answer_text(c) for c in completions],
            "completion_ids": [list(i) if i is not None else None for i in ids],
            **copy.deepcopy(columns),
        }  # copies: a reward that edits its inputs cannot change the dataset
        if not self.takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        out = self.fn(**kwargs)
        if inspect.isawaitable(out):
            with ThreadPoolExecutor(1) as pool:  # its own event loop, also under a notebook's running one
                out = pool.submit(asyncio.run, _awaited(out)).result()
        if hasattr(out, "tolist"):  # numpy array, torch tensor
            out = out.tolist()
        if isinstance(out, list | tuple):  # numpy / torch scalars -> Python numbers
            out = [v.item() if hasattr(v, "item") and not isinstance(v, bool | int | float) else v for v in out]
        return out


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _callable_name(fn: Any, spec: Any, index: int) -> str:
    if isinstance(spec, str):
        return spec.rpartition(":")[2].split(".")[-1]
    inner = getattr(fn, "func", fn)  # functools.partial
    name = getattr(inner, "__name__", None) or type(inner).__name__
    return name if name.isidentifier() else f"reward_{index + 1}"  # "<lambda>"


def _unique(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        candidate, k = name, 2
        while candidate in out:
            candidate, k = f"{name}_{k}", k + 1
        out.append(candidate)
    return out


def _as_list(value: Any, what: str) -> list[Any]:
    """Options that take a list also take one item, or a comma-separated string (``--option rewards=m:f,m:g``)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if callable(value):
        return [value]
    if isinstance(value, Mapping):
        raise TypeError(
            f"{what}: expected a list of 'module:function' strings or callables, got a mapping {dict(value)}"
            " (in YAML, write [module:function] without a space after the colon, or quote it)"
        )
    return list(value)


# --- tools --------------------------------------------------------------------------------------------------------


@register_task
class DatasetTask(Task):
    """``dataset``: your own data and reward functions (see the module docstring). Options: ``path`` (required),
    ``rewards`` (required: 'module:function' strings or, in Python, callables), ``reward_weights``, ``prompt_column``
    (prompt), ``split`` (train), ``eval_split``, ``eval_size``, ``subset`` (a Hub dataset's config), ``limit``,
    ``system``, ``tools`` ('module:function' or callables)."""

    name = "dataset"

    def __init__(
        self,
        *,
        path: Any = None,
        rewards: Any = None,
        reward_weights: Sequence[float] | None = None,
        prompt_column: str = "prompt",
        split: str = "train",
        eval_split: Any = None,
        eval_size: int | None = None,
        subset: str | None = None,
        limit: int | None = None,
        system: str | None = None,
        tools: Any = None,
        instructions: str | None = None,
        **common: Any,
    ) -> None:
        if path is None:
            raise ValueError(f"task {self.name}: path= is required: a data file, a folder, a Hub dataset id, or rows")
        if system is not None and instructions is not None:
            raise ValueError(f"task {self.name}: system= and instructions= are the same thing; give one")
        if limit is not None and limit < 1:
            raise ValueError(f"task {self.name}: limit must be >= 1, got {limit}")
        if eval_size is not None and eval_size < 0:
            raise ValueError(f"task {self.name}: eval_size must be >= 0, got {eval_size}")
        if not isinstance(prompt_column, str) or not prompt_column:
            raise ValueError(f"task {self.name}: prompt_column must be a column name, got {prompt_column!r}")
        self.path, self.split, self.eval_split, self.eval_size = path, split, eval_split, eval_size
        self.subset, self.limit, self.prompt_column = subset, limit, prompt_column
        self._reward_defs = self._build_rewards(rewards, reward_weights)
        self._tool_defs = self._build_tools(tools)
        super().__init__(instructions=system if system is not None else instructions, **common)
        names = [r.name for r in self.rewards]
        self.accuracy_reward = "correct" if "correct" in names else names[0]
        self._data = self._load_splits()  # now: a bad file or column fails before any model loads
        for split in self.splits:
            columns = self.reward_columns(split)
            for reward in self.rewards:
                if isinstance(reward.fn, TrlReward):
                    reward.fn.check(columns, f"the {split} split")

    # --- rewards and tools ------------------------------------------------------------------------------------------

    def _build_rewards(self, rewards: Any, weights: Sequence[float] | None) -> dict[str, Reward]:
        specs = _as_list(rewards, f"task {self.name}: rewards")
        if not specs:
            raise ValueError(f"task {self.name}: rewards= is required: a list of 'module:function' strings (or "
                             "callables in Python), TRL-style reward functions")  # fmt: skip
        fns = [s if callable(s) else load_function(s, "reward") for s in specs]
        names = _unique([_callable_name(fn, spec, i) for i, (fn, spec) in enumerate(zip(fns, specs, strict=True))])
        if weights is None:
            weights = [1.0] * len(fns)
        elif isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
            raise TypeError(f"task {self.name}: reward_weights must be a list of numbers, got {weights!r}")
        if len(weights) != len(fns):
            raise ValueError(f"task {self.name}: {len(weights)} reward_weights for {len(fns)} rewards ({names})")
        out = {}
        for name, fn, weight in zip(names, fns, weights, strict=True):
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ValueError(f"task {self.name}: reward_weights: {weight!r} (for {name}) is not a number")
            out[name] = Reward(name, TrlReward(fn, name), float(weight))
        return out

    def _build_tools(self, tools: Any) -> dict[str, ToolSpec]:
        out: dict[str, ToolSpec] = {}
        for spec in _as_list(tools, f"task {self.name}: tools"):
            if isinstance(spec, ToolSpec):
                tool = spec
            else:
                fn = spec if callable(spec) else load_function(spec, "tool")
                tool = tool_from_function(fn, spec.rpartition(":")[2] if isinstance(spec, str) else None)
            if tool.name in out:
                raise ValueError(f"task {self.name}: two tools are named {tool.name!r}")
            out[tool.name] = tool
        return out

    def reward_definitions(self) -> dict[str, Reward]:
        return self._reward_defs

    def tool_definitions(self) -> dict[str, ToolSpec]:
        return self._tool_defs

    # --- data -----------------------------------------------------------------------------------------------------

    def _load(self, source: Any, split: str) -> list[dict[str, Any]]:
        raw, label = load_source(source, split, subset=self.subset)
        if self.limit is not None:
            raw = raw[: self.limit]
        if raw and not any(isinstance(r, Mapping) and self.prompt_column in r for r in raw):
            columns = sorted({str(k) for r in raw if isinstance(r, Mapping) for k in r})
            raise ValueError(f"task {self.name}: {label} has no column {self.prompt_column!r} (prompt_column); "
                             f"columns: {', '.join(columns)}")  # fmt: skip
        rows = clean_rows(raw, self._check_row, source=f"task {self.name}: {label}")
        clash = sorted({k for r in rows for k in r} & set(REWARD_ARGUMENTS))
        if clash:
            raise ValueError(f"task {self.name}: {label}: a column may not be named {clash[0]!r} (reward functions "
                             "get that argument from the rollout); rename the column")  # fmt: skip
        return rows

    def _check_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.prompt_column not in row:
            raise BadRow(f"no column {self.prompt_column!r} (columns: {', '.join(map(str, row))})")
        value = row[self.prompt_column]
        if isinstance(value, str):
            if not value.strip():
                raise BadRow("empty prompt")
        elif isinstance(value, list):
            _check_chat(value)
        else:
            raise BadRow(f"prompt is {type(value).__name__}, not text or a list of chat messages")
        return dict(row)

    def _load_splits(self) -> dict[str, list[dict[str, Any]]]:
        train = self._load(self.path, self.split)
        if self.eval_split is None:
            n = len(train)
            size = self.eval_size if self.eval_size is not None else min(100, math.ceil(0.05 * n))
            size = min(size, n - 1)
            if size <= 0:
                log.warning("task %s: %d training rows: none held out; evaluating on the training rows", self.name, n)
                return {"train": train, "eval": train}
            held = set(random.Random(self.seed).sample(range(n), size))
            return {"train": [r for i, r in enumerate(train) if i not in held],
                    "eval": [r for i, r in enumerate(train) if i in held]}  # fmt: skip
        if isinstance(self.eval_split, str) and self.eval_split == self.split:
            return {"train": train, "eval": train}
        if isinstance(self.eval_split, str | os.PathLike) and (
            Path(self.eval_split).suffix.lower() in FILE_SUFFIXES or _in_memory_rows(self.path) is not None
        ):
            return {"train": train, "eval": self._load(self.eval_split, "train")}  # a file of its own
        if isinstance(self.eval_split, str):
            return {"train": train, "eval": self._load(self.path, self.eval_split)}  # a split of the same source
        return {"train": train, "eval": self._load(self.eval_split, "train")}  # rows / a Dataset

    def load_split(self, split: str) -> list[dict[str, Any]]:
        return self._data[split]

    def reward_columns(self, split: str = "train") -> list[str]:
        """The columns reward functions receive as keyword lists (every column but ``prompt``/``completion``)."""
        keys = {k for r in self._data[split] for k in r}
        return sorted(k for k in keys - set(NOT_COLUMNS) if isinstance(k, str))

    # --- prompts and scoring --------------------------------------------------------------------------------------

    def messages(self, row: Mapping[str, Any]) -> list[Message]:
        value = row[self.prompt_column]
        return [Message.user(value)] if isinstance(value, str) else messages_from_chat(value)

    def prompt(self, row: Mapping[str, Any]) -> Prompt:
        prompt = super().prompt(row)
        if prompt.messages and prompt.messages[0].role == "developer":
            prompt.instructions = None  # the row's own system message is its instructions
        return prompt

    def score(
        self, rows: Sequence[Mapping[str, Any]], completions: Sequence[Any], *, tokenizer: Any = None
    ) -> RewardOutput:
        """Rewards of ``completions[i]`` for ``rows[i]`` (token ids, engine Completions, parsed ones or strings), with
        TRL's arguments (see the module docstring)."""
        if len(rows) != len(completions):
            raise ValueError(f"task {self.name}: {len(rows)} rows for {len(completions)} completions")
        parsed = [self.parse(c, tokenizer) for c in completions]
        ids = [_token_ids(c) for c in completions]
        keys = sorted({k for r in rows for k in r} - set(NOT_COLUMNS))
        columns = {k: [r.get(k) for r in rows] for k in keys}
        prompts = [r.get(self.prompt_column) for r in rows]
        return self.reward_set(prompts, parsed, completion_ids=ids, **columns)


def _token_ids(completion: Any) -> list[int] | None:
    ids = getattr(completion, "token_ids", None)
    if ids is not None:
        return [int(t) for t in ids]
    if (
        isinstance(completion, Sequence)
        and not isinstance(completion, str)
        and completion
        and all(isinstance(t, int) for t in completion)
    ):
        return [int(t) for t in completion]
    return None


def _check_chat(chat: list[Any]) -> None:
    """A list of chat messages the renderer takes, or BadRow saying what is wrong."""
    if not chat:
        raise BadRow("empty chat")
    for i, m in enumerate(chat):
        if not isinstance(m, Mapping):
            raise BadRow(f"chat message {i} is {type(m).__name__}, not an object")
        if m.get("role") not in CHAT_ROLES:
            raise BadRow(f"chat message {i} has role {m.get('role')!r}, not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str | type(None)):
            raise BadRow(f"chat message {i}: content is {type(m.get('content')).__name__}, not text")
        if m["role"] in ("system", "developer") and i > 0:
            raise BadRow(f"chat message {i}: a {m['role']} message must come first")
    if all(m["role"] in ("system", "developer") for m in chat):
        raise BadRow("chat has no user message")
    try:
        messages_from_chat(chat)
    except (ValueError, KeyError, TypeError) as err:
        raise BadRow(f"not a chat: {err}") from None


# --- tasks built in Python (ossrl.GRPOTrainer) ----------------------------------------------------------------------


def register_bound_dataset_task(name: str, **bound: Any) -> type[DatasetTask]:
    """Register ``name`` as the dataset task with ``bound`` options (callables, in-memory rows: what a YAML config
    cannot hold), so the trainer's ``get_task(name, **options)`` builds it; the options it passes are added (and win).
    Undo with :func:`ossrl.tasks.base.unregister_task`."""

    def __init__(self: DatasetTask, **options: Any) -> None:
        DatasetTask.__init__(self, **{**bound, **options})

    cls = type(f"DatasetTask[{name}]", (DatasetTask,), {"name": name, "__init__": __init__, "bound": bound})
    register_task(cls)
    return cls


__all__ = [
    "DatasetFileError",
    "DatasetTask",
    "TrlReward",
    "answer_text",
    "load_function",
    "load_source",
    "read_data_file",
    "register_bound_dataset_task",
    "tool_from_function",
    "unregister_task",
]
