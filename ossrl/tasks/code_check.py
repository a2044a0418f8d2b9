"""Static checks on model-written code, by its AST (never by string search, which ``__imp`` + ``ort__`` defeats).

The policy is told to use pure Python and a few harmless standard-library modules. Anything that could reach the
process, the harness or compiled code is a violation: imports outside ``allowed`` (numpy, and stdlib modules such
as os, sys, time, gc, inspect, ctypes, importlib), the dynamic-code builtins (``__import__``, ``exec``, ``eval``,
``compile``), reflection (``getattr``/``setattr``/``globals``/``vars``, ``operator.attrgetter``...), any dunder
name (``__builtins__``), any attribute starting with ``_`` (``__class__``, ``__subclasses__``, ``collections._sys``),
frame and code attributes (``f_back``, ``tb_frame``, ``gi_frame``) and attributes named like a module
(``fractions.sys``).
"""

from __future__ import annotations

import ast
import sys
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
     "mro", "modules"}
)  # fmt: skip
# Attributes named like a module that gives reach into the process (``typing.sys``, ``collections.abc.sys``).
MODULE_ATTRS: frozenset[str] = frozenset(
    {"sys", "os", "builtins", "importlib", "gc", "inspect", "ctypes", "time", "subprocess", "signal", "threading",
     "multiprocessing", "types", "marshal", "pickle", "io", "socket", "resource", "posix", "nt"}
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
        elif isinstance(node, ast.Name):
            if node.id in FORBIDDEN_NAMES:
                found.append(f"line {line}: uses {node.id}")
            elif node.id.startswith("__") and node.id.endswith("__"):
                found.append(f"line {line}: uses the dunder name {node.id}")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                found.append(f"line {line}: accesses the private attribute .{node.attr}")
            elif node.attr in FRAME_ATTRS or node.attr in MODULE_ATTRS or node.attr in FORBIDDEN_NAMES:
                found.append(f"line {line}: accesses .{node.attr}")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            report.functions.add(node.name)
        elif isinstance(node, ast.Assign):
            report.functions |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    # Keep the list readable: one entry per distinct message.
    report.violations = list(dict.fromkeys(found))
    return report
