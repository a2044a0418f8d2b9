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
import csv
import importlib
import inspect
import io
import json
import logging
import math
import os
import random
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ossrl.harmony import Message, ParsedCompletion, Tool, messages_from_chat
from ossrl.harmony.tools import check_tool_schema
from ossrl.tasks.base import Prompt, Task, ToolSpec, _unknown, register_task, unregister_task
from ossrl.tasks.data import BadRow, clean_rows, load_hub
from ossrl.tasks.rewards import Reward, RewardOutput

log = logging.getLogger("ossrl.tasks")

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids")  # what every reward gets besides the columns
NOT_COLUMNS = ("prompt", "completion")  # TRL: these columns are what prompts/completions hold, never passed again
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class DatasetFileError(ValueError):
    """A data file that cannot be read as a dataset; the message names the file and, where there is one, the line."""


# --- reading data ---------------------------------------------------------------------------------------------------


def read_data_file(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a local .jsonl / .json / .csv / .parquet file, strictly: invalid UTF-8, a line that is not a JSON
    object, a CSV row with the wrong number of fields raise :class:`DatasetFileError` naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {str(p)!r} does not exist (working directory: {Path.cwd()})")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _json_lines(p, _decode(p))
    if suffix == ".json":
        return _json_file(p, _decode(p))
    if suffix == ".csv":
        return _csv_file(p, _decode(p))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as err:  # noqa: BLE001 (pyarrow raises several kinds for a damaged file)
            raise DatasetFileError(f"{p}: not a readable parquet file ({type(err).__name__}: {err})") from err
    raise DatasetFileError(f"{p}: unsupported dataset file type {p.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetFileError(
            f"{path}:{line}: not UTF-8 text: byte 0x{data[err.start]:02x} at byte {column} of line {line} "
            "(save the file as UTF-8)"
        ) from None
    return text.removeprefix("\ufeff")


def _json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetFileError(f"{path}:{number}: not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(value, dict):
            raise DatasetFileError(f"{path}:{number}: a line must be a JSON object (one row), got "
                                   f"{type(value).__name__}")  # fmt: skip
        rows.append(value)
    return rows


def _json_file(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines in a .json file (the Hub's loader reads those too)
            return _json_lines(path, text)
        raise DatasetFileError(f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
    if isinstance(data, list):
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DatasetFileError(f"{path}: item {i} of the list is {type(row).__name__}, not an object (a row)")
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:  # columns: {"prompt": [...], "answer": [...]}
            return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    raise DatasetFileError(f"{path}: a .json dataset must be a list of objects (rows) or an object of equal-length "
                           "column lists")  # fmt: skip


def _csv_file(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise DatasetFileError(f"{path}:1: a .csv dataset needs a header row naming the columns")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DatasetFileError(f"{path}:1: repeated column names {repeated}")
    records = []
    for values in reader:
        if not values:
            continue
        if len(values) != len(header):
            raise DatasetFileError(f"{path}:{reader.line_num}: {len(values)} fields; the header has {len(header)}")
        records.append(values)
    columns = [_csv_column([r[j] for r in records]) for j in range(len(header))]
    return [{name: col[i] for name, col in zip(header, columns, strict=True)} for i in range(len(records))]


def _csv_column(values: list[str]) -> list[Any]:
    """Typed as pandas (and so ``datasets``) reads CSV: all-integer columns are ints, all-number columns floats, the
    rest strings; empty fields are None."""
    filled = [v for v in values if v != ""]
    for kind in (int, float):
        try:
            converted = [kind(v) for v in filled]
        except ValueError:
            continue
        it = iter(converted)
        return [next(it) if v != "" else None for v in values]
    return [v if v != "" else None for v in values]


def _folder_files(folder: Path, split: str) -> tuple[list[Path], list[str]]:
    """The data files of ``split`` in a folder, by the Hub's file-name rules, and the splits it has."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), str(folder))
    except Exception as err:  # noqa: BLE001 (datasets raises its own EmptyDatasetError / FileNotFoundError)
        raise DatasetFileError(f"{folder}: no data files found ({type(err).__name__}: {err})") from err
    splits = {str(name): [Path(f) for f in files if Path(f).suffix.lower() in FILE_SUFFIXES]
              for name, files in found.items()}  # fmt: skip
    splits = {name: sorted(files) for name, files in splits.items() if files}
    if not splits:
        raise DatasetFileError(f"{folder}: no {'/'.join(FILE_SUFFIXES)} files in this folder")
    return splits.get(split, []), sorted(splits)


def _in_memory_rows(source: Any) -> list[Any] | None:
    """Rows of a list of dicts, a ``datasets.Dataset`` or a pandas DataFrame; None for anything else."""
    if isinstance(source, list | tuple):
        return list(source)
    if hasattr(source, "column_names") and hasattr(source, "to_list"):  # datasets.Dataset
        return source.to_list()
    if hasattr(source, "to_dict") and hasattr(source, "columns") and hasattr(source, "iloc"):  # pandas.DataFrame
        return source.to_dict("records")
    return None


def _is_split_mapping(source: Any) -> bool:
    """A ``DatasetDict`` or a plain ``{split: rows}`` mapping."""
    return isinstance(source, Mapping) and bool(source) and all(_in_memory_rows(v) is not None for v in source.values())


def load_source(source: Any, split: str, *, subset: str | None = None) -> tuple[list[Any], str]:
    """(raw rows, a label for messages) of ``split`` of a data source (see the module docstring)."""
    rows = _in_memory_rows(source)
    if rows is not None:
        if split != "train":
            raise ValueError(f"a {type(source).__name__} of rows is one split; it has no split {split!r} (leave "
                             "split as 'train', or pass a DatasetDict / {split: rows} mapping)")  # fmt: skip
        return rows, f"{type(source).__name__} of {len(rows)} rows"
    if _is_split_mapping(source):
        if split not in source:
            raise ValueError(f"the dataset has no split {split!r}; splits: {', '.join(map(str, source))}")
        rows = _in_memory_rows(source[split]) or []
        return rows, f"split {split!r} ({len(rows)} rows)"
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"dataset path: expected a file, a folder, a Hub dataset id, a list of dicts or a "
                        f"datasets.Dataset; got {type(source).__name__}")  # fmt: skip
    path = Path(source).expanduser()
    if path.is_file():
        if split != "train":
            raise ValueError(f"{path} is one file, read as the split 'train'; it has no split {split!r} (give the "
                             "held-out rows as another file: eval_split: FILE)")  # fmt: skip
        return read_data_file(path), str(path)
    if path.is_dir():
        files, splits = _folder_files(path, split)
        if not files:
            raise ValueError(f"{path}: no data files for split {split!r}; splits found: {', '.join(splits)}")
        return [row for f in files for row in read_data_file(f)], f"{path} [{split}]"
    text = str(source)
    if path.suffix.lower() in FILE_SUFFIXES or text.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"dataset {text!r}: no such file or folder (working directory: {Path.cwd()})")
    return load_hub(text, subset, split), f"{text}[{split}]" + (f" ({subset})" if subset else "")


# --- module:function ------------------------------------------------------------------------------------------------

_IMPORTED_FROM: dict[str, str] = {}  # top-level module name -> the working directory we imported it from


def load_function(spec: str, what: str = "function") -> Callable[..., Any]:
    """The callable named by ``"module:function"`` (``module`` may be dotted: ``pkg.rewards:correct``), imported from
    the working directory first (as ``python -m`` would), else from the installed packages. Raises ValueError naming
    the module, the function and where it looked."""
    if not isinstance(spec, str):
        raise TypeError(f"{what}: expected a callable or a 'module:function' string, got {type(spec).__name__}")
    module_name, sep, attr = spec.strip().rpartition(":")
    cwd = os.getcwd()
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'module:function', e.g. 'my_rewards:correct' for the function "
                         f"correct in my_rewards.py in the working directory ({cwd})")  # fmt: skip
    if module_name.endswith(".py"):
        stem = module_name[:-3].replace("/", ".").replace("\\", ".")
        raise ValueError(f"{what} {spec!r}: {module_name!r} is a file name; name the module: '{stem}:{attr}' (run "
                         f"from the folder that holds {Path(module_name).name})")  # fmt: skip
    module = _import(module_name, what, spec, cwd)
    where = getattr(module, "__file__", None) or module_name
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        hint = _unknown("function", attr, names, f"module {module_name!r} ({where}) has no")
        raise ValueError(f"{what} {spec!r}: {hint}")
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {module_name}.{attr} ({where}) is a {type(fn).__name__}, not a function")
    return fn


def _import(module_name: str, what: str, spec: str, cwd: str) -> types.ModuleType:
    top = module_name.split(".")[0]
    local = Path(cwd, top + ".py").is_file() or Path(cwd, top, "__init__.py").is_file()
    cached = sys.modules.get(top)
    if local and cached is not None and _IMPORTED_FROM.get(top) != cwd:
        if top not in _IMPORTED_FROM:  # imported by someone else: replacing it would break them
            raise ValueError(f"{what} {spec!r}: the working directory {cwd} has {top}.py, but a module {top!r} is "
                             f"already imported from {getattr(cached, '__file__', None) or 'elsewhere'}; rename "
                             "your file")  # fmt: skip
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:  # ours, from another folder
            del sys.modules[name]
    sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ValueError(
                f"{what} {spec!r}: no module {module_name!r}: looked in the working directory {cwd} "
                f"(for {module_name.replace('.', '/')}.py) and among the installed packages"
            ) from None
        raise ValueError(f"{what} {spec!r}: importing module {module_name!r} failed: {err}") from err
    except Exception as err:  # noqa: BLE001 (a syntax error or a crash in the user's module)
        raise ValueError(f"{what} {spec!r}: importing module {module_name!r} raised {type(err).__name__}: "
                         f"{err}") from err  # fmt: skip
    finally:
        sys.path.remove(cwd)  # the first occurrence: the one put there above
    file = getattr(module, "__file__", None)
    if local and file and Path(file).resolve().is_relative_to(Path(cwd).resolve()):
        _IMPORTED_FROM[top] = cwd
    return module


# --- rewards ----------------------------------------------------------------------------------------------------------


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

_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
                               dict: "object"}  # fmt: skip


def tool_from_function(fn: Callable[..., Any], name: str | None = None) -> ToolSpec:
    """A Harmony tool from a plain Python function: JSON-schema parameters from its signature and type hints, the
    description from its docstring's first line (parameters from an ``Args:`` section). Raises ValueError naming the
    tool and the parameter it cannot describe."""
    name = name or getattr(fn, "__name__", "")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        raise ValueError(f"tool {fn!r}: its name {name!r} is not an identifier the model can call")

    def fail(problem: str) -> typing.NoReturn:
        raise ValueError(f"tool {name!r}: {problem}; a tool takes named parameters typed str, int, float, bool, "
                         "list[...], dict, Literal[...] or X | None")  # fmt: skip

    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError) as err:
        fail(f"its signature cannot be read ({type(err).__name__}: {err})")
    doc = inspect.getdoc(fn) or ""
    described = _arg_docs(doc)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            fail(f"parameter {'*' if p.kind is p.VAR_POSITIONAL else '**'}{p.name} cannot be described")
        if p.kind is p.POSITIONAL_ONLY:
            fail(f"parameter {p.name!r} is positional-only; the model's arguments are passed by name")
        if p.name not in hints:
            fail(f"parameter {p.name!r} has no type hint")
        schema = _schema(hints[p.name], lambda problem, p=p: fail(f"parameter {p.name!r}: {problem}"))
        if p.default is p.empty:
            required.append(p.name)
        elif p.default is not None:
            try:
                schema["default"] = json.loads(json.dumps(p.default, allow_nan=False))  # a tuple -> a list
            except (TypeError, ValueError):
                pass
        if p.name in described:
            schema["description"] = described[p.name]
        properties[p.name] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    check_tool_schema(name, parameters)
    description = doc.strip().split("\n", 1)[0].strip() if doc.strip() else ""
    return ToolSpec(Tool(name, description, parameters), fn)


def _schema(hint: Any, fail: Callable[[str], typing.NoReturn]) -> dict[str, Any]:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return {}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            fail(f"the union {hint} cannot be described (only X | None)")
        return _schema(rest[0], fail)
    if origin is Literal:
        kinds = {type(a) for a in args}
        schema: dict[str, Any] = {"enum": list(args)}
        if len(kinds) == 1 and next(iter(kinds)) in _JSON_TYPES:
            schema["type"] = _JSON_TYPES[next(iter(kinds))]
        return schema
    if origin in (list, set, frozenset, Sequence):
        return {"type": "array", **({"items": _schema(args[0], fail)} if args else {})}
    if origin is tuple:  # tuple[int, ...] is a list of ints; a fixed-length tuple is any list
        return {"type": "array", **({"items": _schema(args[0], fail)} if len(args) == 2 and args[1] is ... else {})}
    if origin in (dict, Mapping):
        return {"type": "object"}
    fail(f"type {getattr(hint, '__name__', hint)!r} cannot be described in JSON schema")


def _arg_docs(doc: str) -> dict[str, str]:
    """Parameter descriptions from a Google-style ``Args:`` section (``name: text`` or ``name (type): text``, with
    more-indented continuation lines)."""
    lines = doc.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:", "Parameters:")), None)
    if start is None:
        return {}
    out: dict[str, str] = {}
    indent, current = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break  # the next section
        item = re.match(r"\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if item and (indent is None or depth <= indent):
            indent, current = depth, item.group(1)
            out[current] = item.group(2).strip()
        elif current is not None:
            out[current] = f"{out[current]} {line.strip()}".strip()
    return out


# --- the task -------------------------------------------------------------------------------------------------------


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
