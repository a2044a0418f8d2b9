"""A safe calculator for the model: arithmetic expressions evaluated by walking their AST (never ``eval``).

Allowed: int and float literals, + - * / // % ** and unary +/-, parentheses. Bounded: expression length, number of
nodes, exponent size and the magnitude of every intermediate result, so ``9**9**9`` or a 10,000-digit product
fail fast instead of eating the CPU. Anything else (names, calls, attributes, strings, comprehensions) is rejected.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from ossrl.harmony import Tool

MAX_CHARS = 200
MAX_NODES = 64
MAX_EXPONENT = 64
MAX_ABS = 10**30
_ALLOWED_CHARS = re.compile(r"[0-9eE._+\-*/%()\s]*")

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}

CALCULATOR_TOOL = Tool(
    "calculator",
    # Short on purpose: the tiny demo model reads this in every prompt, and an example number here is one more
    # number it could copy by mistake.
    "Evaluates an arithmetic expression: + - * / // % ** and parentheses.",
    {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message says why."""


def _check(value: Any) -> int | float:
    if isinstance(value, complex):  # (-8) ** 0.5
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    if abs(value) > MAX_ABS:
        raise CalculatorError(f"a value exceeds {MAX_ABS:.0e} in magnitude")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            return _check(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("overflow") from None
    what = type(node).__name__
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        what = type(node.op).__name__
    raise CalculatorError(f"{what} is not allowed: only numbers, + - * / // % ** and parentheses")


def safe_eval(expression: str) -> int | float:
    """The value of an arithmetic expression; raises CalculatorError for anything else."""
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be a string, not {type(expression).__name__}")
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    if not _ALLOWED_CHARS.fullmatch(text):  # before parsing: names and strings never reach ast.parse's warnings
        raise CalculatorError("not allowed: only numbers, + - * / // % ** and parentheses")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise CalculatorError(f"not an arithmetic expression ({err.msg})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    return _eval(tree.body)


def format_number(value: int | float) -> str:
    """Integers as integers (``6 / 3`` -> ``2``), other floats rounded to 10 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def calculator(expression: str | None = None, **extra: Any) -> str:
    """The tool: the value as text, or ``error: ...`` for the model to read (never raises)."""
    if extra:
        return f"error: unexpected argument(s) {sorted(extra)}; calculator takes {{'expression': '...'}}"
    try:
        return format_number(safe_eval(expression))  # type: ignore[arg-type]
    except CalculatorError as err:
        return f"error: {err}"
