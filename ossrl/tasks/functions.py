"""Python functions as task parts: ``module:function`` imported from the working directory first, and plain functions
turned into Harmony tools (JSON schema from type hints, description from the docstring)."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ossrl.harmony import Tool
from ossrl.harmony.tools import check_tool_schema
from ossrl.tasks.base import ToolSpec, _unknown

log = logging.getLogger("ossrl.tasks")


_IMPORTED_FROM: dict[str, str] = {}  # top-level module name -> the working directory we imported it from
_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
                               dict: "object"}  # fmt: skip


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
