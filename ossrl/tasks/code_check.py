"""Static checks on model-written code, by its AST (never by string search, which ``__imp`` + ``ort__`` defeats).

The policy is told to use pure Python and a few harmless standard-library modules. Anything that could reach the
process, the harness or compiled code is a violation: imports outside ``allowed`` (numpy, and stdlib modules such
as os, sys, time, gc, inspect, ctypes, importlib), also when an allowed module re-exports them
(``from fractions import sys``); the dynamic-code builtins (``__import__``, ``exec``, ``eval``, ``compile``);
reflection (``getattr``/``setattr``/``globals``/``vars``, ``operator.attrgetter``...); any dunder name
(``__builtins__``); any attribute starting with ``_`` (``__class__``, ``__subclasses__``, ``collections._sys``);
frame, traceback, generator, coroutine and code attributes (``f_back``, ``tb_frame``, ``gi_frame``, ``cr_frame``,
``co_consts``, ``cell_contents``) and attributes named like a module (``fractions.sys``).

Attribute access by name where no ``ast.Attribute`` shows it is closed too:
- ``match`` class patterns with arguments: ``case object(f_back=f)`` reads ``f_back``, and ``case C(x)`` reads
  whatever ``C.__match_args__`` names (a metaclass's ``__instancecheck__`` makes any object match);
- ``str.format`` fields walk attributes and indexes (``"{0.__traceback__.tb_frame}".format(e)``): ``.format``
  is allowed only on a string literal whose fields are plain (``"{}"``, ``"{0}"``, ``"{name:>8}"``);
  ``format_map``, ``str.format`` and ``.format`` on anything computed are violations.
"""

from __future__ import annotations

import ast
import importlib
import string
import sys
import types
import warnings
from dataclasses import dataclass, field

SAFE_IMPORTS: frozenset[str] = frozenset(
    {"__future__", "array", "bisect", "collections", "fractions", "functools", "heapq", "itertools", "math",
     "numbers", "operator"}
)  # fmt: skip
FORBIDDEN_NAMES: frozenset[str] = frozenset(
    {"__import__", "exec", "eval", "compile", "globals", "locals", "vars", "getattr", "setattr", "delattr", "open",
     "input", "breakpoint", "exit", "quit", "help", "memoryview", "builtins", "importlib",
     "attrgetter", "methodcaller"}  # attribute access by string: attrgetter("__class__") escapes the dunder check
)  # fmt: skip
FRAME_ATTRS: frozenset[str] = frozenset(
    {"f_back", "f_locals", "f_globals", "f_builtins", "f_code", "f_trace", "tb_frame", "tb_next", "gi_frame",
     "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "co_code", "co_consts", "func_globals", "func_code",
     "func_closure", "cell_contents", "im_func", "im_self", "mro", "modules", "format_map"}
)  # fmt: skip
# CPython's frame (f_), traceback (tb_), generator (gi_), coroutine (cr_), async generator (ag_) and code (co_)
# attributes: all of them, including any a later Python adds.
FRAME_PREFIXES: tuple[str, ...] = ("f_", "tb_", "gi_", "cr_", "ag_", "co_")
# Attributes named like a module that gives reach into the process (``typing.sys``, ``collections.abc.sys``,
# ``fractions.re.copyreg``).
MODULE_ATTRS: frozenset[str] = frozenset(
    {"sys", "os", "builtins", "importlib", "gc", "inspect", "ctypes", "time", "subprocess", "signal", "threading",
     "multiprocessing", "types", "marshal", "pickle", "io", "socket", "resource", "posix", "nt", "re", "enum",
     "copyreg", "weakref", "traceback", "linecache", "codecs", "warnings", "atexit", "decimal", "select", "mmap",
     "pty", "fcntl", "shutil", "tempfile", "pathlib", "runpy", "code", "codeop", "dis", "ast", "string"}
)  # fmt: skip


@dataclass
class CodeReport:
    """``parses``: the source is valid Python. ``violations``: what is not allowed, with line numbers.
    ``functions``: names of top-level functions (and top-level names assigned)."""

    parses: bool
    syntax_error: str | None = None
    violations: list[str] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)

    @property
    def clean(self) -> bool:
        return self.parses and not self.violations


def _import_violation(module: str, line: int, allowed: frozenset[str]) -> str | None:
    top = module.split(".")[0]
    if top in allowed:
        return None
    if top in sys.stdlib_module_names:
        return f"line {line}: imports {module} (standard library, but outside the allowed set {sorted(allowed)})"
    return f"line {line}: imports {module}, which is not in the standard library"


def _reexported_module(module: str, name: str, line: int, allowed: frozenset[str]) -> str | None:
    """``from fractions import sys``: a name of an allowed module that is itself a module outside ``allowed``."""
    if name in MODULE_ATTRS:
        return f"line {line}: imports the module {name} through {module}"
    if module.split(".")[0] not in sys.stdlib_module_names:
        return None  # a third-party module someone allowed is never imported here to look inside
    try:
        value = getattr(importlib.import_module(module), name, None)  # an allowed standard-library module
    except Exception:  # noqa: BLE001 (no such module: the import fails when it runs)
        return None
    if isinstance(value, types.ModuleType) and value.__name__.split(".")[0] not in allowed:
        return f"line {line}: imports the module {value.__name__} through {module}"
    return None


def _format_violation(node: ast.Attribute, line: int) -> str | None:
    """``.format`` only on a string literal with plain fields: a field name holding ``.`` or ``[`` walks
    attributes and indexes of the arguments, out of the AST's sight."""
    if not isinstance(node.value, ast.Constant) or not isinstance(node.value.value, str):
        return f"line {line}: calls .format on something that is not a string literal"
    todo = [node.value.value]
    while todo:
        try:
            fields = list(string.Formatter().parse(todo.pop()))
        except ValueError:
            return f"line {line}: a .format string that does not parse"
        for _, name, spec, _ in fields:
            if name is not None and ("." in name or "[" in name):
                return f"line {line}: a .format field that reads attributes or items ({{{name}}})"
            if spec:
                todo.append(spec)
    return None


def check_code(source: str, *, allowed_imports: frozenset[str] | set[str] = SAFE_IMPORTS) -> CodeReport:
    try:
        with warnings.catch_warnings():  # model-written code: "invalid escape sequence" etc. are not ours to print
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source)
    except (SyntaxError, ValueError) as err:  # ValueError: NUL bytes
        where = f" (line {err.lineno})" if isinstance(err, SyntaxError) and err.lineno else ""
        msg = err.msg if isinstance(err, SyntaxError) else str(err)
        return CodeReport(False, f"{msg}{where}")
    allowed = frozenset(allowed_imports)
    report = CodeReport(True)
    found = report.violations
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [v for a in node.names if (v := _import_violation(a.name, line, allowed))]
        elif isinstance(node, ast.ImportFrom):
            if node.level or not node.module:
                found.append(f"line {line}: relative import")
            elif v := _import_violation(node.module, line, allowed):
                found.append(v)
            found += [f"line {line}: imports private name {a.name}" for a in node.names if a.name.startswith("_")]
            found += [f"line {line}: imports {a.name}" for a in node.names if a.name in FORBIDDEN_NAMES]
            if not node.level and node.module and node.module.split(".")[0] in allowed:
                found += [v for a in node.names if (v := _reexported_module(node.module, a.name, line, allowed))]
        elif isinstance(node, ast.Name):
            if node.id in FORBIDDEN_NAMES:
                found.append(f"line {line}: uses {node.id}")
            elif node.id.startswith("__") and node.id.endswith("__"):
                found.append(f"line {line}: uses the dunder name {node.id}")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                found.append(f"line {line}: accesses the private attribute .{node.attr}")
            elif (
                node.attr in FRAME_ATTRS
                or node.attr.startswith(FRAME_PREFIXES)
                or node.attr in MODULE_ATTRS
                or node.attr in FORBIDDEN_NAMES
            ):
                found.append(f"line {line}: accesses .{node.attr}")
            elif node.attr == "format" and (v := _format_violation(node, line)):
                found.append(v)
        elif isinstance(node, ast.MatchClass) and (node.patterns or node.kwd_patterns):
            found.append(f"line {line}: a class pattern with arguments reads attributes by name (case C(...))")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            report.functions.add(node.name)
        elif isinstance(node, ast.Assign):
            report.functions |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    # Keep the list readable: one entry per distinct message.
    report.violations = list(dict.fromkeys(found))
    return report
