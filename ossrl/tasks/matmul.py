"""``matmul``: write ``matmul(A, B)`` on lists of lists in pure Python, correct and faster than the naive loop.

Grading one submission (:func:`evaluate_matmul`), each step gating the next:
1. parses: the final answer holds Python (the last fenced code block, else the whole text) that parses;
2. clean: the AST check (code_check.py) finds no forbidden import, builtin, dunder, reflection, frame attribute,
   class pattern with arguments or format field that walks attributes; a violation costs the ``clean`` penalty
   (-1) and the code is never run;
3. runs / correct: a fresh sandboxed run of the harness (_matmul_harness.py): a parent process that holds the
   inputs and times each call on its own clock, and the submission in a child process forked before the inputs
   existed, whose only way out is a pipe the parent reads. Each call's answer leaves the child inside the timed
   window, as raw doubles: nothing the submission defers (a placeholder filled in by a later call, a lazy object)
   can count. Inputs are drawn fresh from the OS's randomness on every call (odd shapes, ints and floats); this
   process computes the expected products and compares every answer;
4. fast: ``rounds`` fresh runs (cold caches), each timing ``repeats`` calls on new inputs (every output checked
   again), against the naive baseline timed the same way in its own runs, interleaved. The speedup compares the
   fastest call of each (noise only ever adds time); ``fast = clip((speedup - 1) / (target_speedup - 1), 0, 1)``.
A run that did not exit 0 within its limits is a crash whatever it printed (no runs, correct or fast); so is a
report that is not exactly what the harness writes, and an impossible time.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import re
import secrets
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ossrl.harmony import ParsedCompletion
from ossrl.tasks.base import Task, register_task
from ossrl.tasks.code_check import SAFE_IMPORTS, check_code
from ossrl.tasks.rewards import Reward, per_sample

log = logging.getLogger("ossrl.tasks")

HARNESS = (Path(__file__).parent / "_matmul_harness.py").read_text()
NAIVE = """def matmul(A, B):
    n, m, p = len(A), len(B), len(B[0])
    C = [[0] * p for _ in range(n)]
    for i in range(n):
        for j in range(p):
            s = 0
            for k in range(m):
                s += A[i][k] * B[k][j]
            C[i][j] = s
    return C
"""
MATMUL_PROMPT = (
    "Write a Python function `matmul(A, B)` that multiplies two matrices given as lists of lists of numbers "
    "(A is n x m, B is m x p, all sizes >= 1) and returns the n x p product as a list of lists. Use pure Python: "
    "no third-party libraries, and from the standard library only {allowed}. Make it as fast as you can; it will "
    "be timed on {size} x {size} matrices against a straightforward triple loop. Put the code in one ```python "
    "code block in your final answer."
)
MIN_SECONDS_PER_MULADD = 2e-9  # an order of magnitude below the fastest pure Python: a faster "time" is a lie


def extract_code(text: str | None) -> str:
    """The last fenced code block that defines matmul, else the last fenced block, else the whole text."""
    if not text:
        return ""
    blocks = re.findall(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", text, flags=re.DOTALL | re.IGNORECASE)
    with_def = [b for b in blocks if "def matmul" in b]
    return (with_def or blocks or [text])[-1]


@dataclass
class MatmulEval:
    parses: bool = False
    clean: bool = True
    runs: bool = False
    correct: bool = False
    speedup: float | None = None
    reason: str = ""
    violations: list[str] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)
    baseline_times_s: list[float] = field(default_factory=list)


def _matrix(rng: random.Random, rows: int, cols: int, floats: bool) -> list[list[Any]]:
    if floats:
        return [[rng.uniform(-1.0, 1.0) for _ in range(cols)] for _ in range(rows)]
    return [[rng.randint(-1000, 1000) for _ in range(cols)] for _ in range(rows)]


def _product(a: list[list[Any]], b: list[list[Any]]) -> list[list[Any]]:
    bt = list(zip(*b, strict=True))
    return [[sum(x * y for x, y in zip(row, col, strict=True)) for col in bt] for row in a]


def _close(got: Any, want: list[list[Any]]) -> bool:
    if not isinstance(got, list) or len(got) != len(want):  # a tuple: the (rows, cols) of a wrong shape
        return False
    if any(len(g) != len(w) for g, w in zip(got, want, strict=True)):
        return False
    pairs = (xy for g, w in zip(got, want, strict=True) for xy in zip(g, w, strict=True))
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in pairs)


def _cases(rng: random.Random) -> list[tuple[list, list]]:
    """Small odd shapes, ints and floats, new numbers every call."""
    shapes = [(1, 1, 1), (2, 3, 4), (5, 1, 5), (4, 7, 3), (3, 3, 3)]
    return [(_matrix(rng, n, m, i % 2 == 1), _matrix(rng, m, p, i % 2 == 1)) for i, (n, m, p) in enumerate(shapes)]


def _encode(matrix: list[list[Any]]) -> list[Any]:
    """[typecode, rows, cols, base64 of the values]: ints as int64 ("q"), anything else as doubles ("d")."""
    flat = [x for row in matrix for x in row]
    typecode = "q" if all(type(x) is int for x in flat) else "d"
    return [typecode, len(matrix), len(matrix[0]), base64.b64encode(array(typecode, flat).tobytes()).decode()]


def _decode(item: Any, shape: tuple[int, int]) -> list[list[float]] | tuple[int, int]:
    """One answer from the report: the matrix when it has the expected shape, else the shape it had."""
    rows, cols, data = item
    if type(rows) is not int or type(cols) is not int or type(data) is not str:
        raise ValueError("bad output entry")
    if (rows, cols) != shape:
        if data:
            raise ValueError("data with a wrong shape")
        return rows, cols
    flat = array("d")
    flat.frombytes(base64.b64decode(data, validate=True))
    if len(flat) != rows * cols:
        raise ValueError("output size does not match its shape")
    values = flat.tolist()
    return [values[i * cols : (i + 1) * cols] for i in range(rows)]


def _run_harness(code: str, spec: dict[str, Any], timeout_s: float, memory_mb: int) -> tuple[dict | None, str]:
    """One fresh sandboxed run of the harness on ``spec`` ({"allowed", "cases", "timed"}, matrices as lists).

    Returns ({"outputs": [matrix, or the (rows, cols) of a wrong shape], "elapsed": [s per timed call]}, "") or
    ({"error": what the submission did}, ""), or (None, why the run counts as a crash): it did not exit 0 within
    its limits, or its report is missing, duplicated or not what the harness writes."""
    from ossrl.sandbox import run_python

    nonce = secrets.token_hex(16)
    calls = [*spec["cases"], *spec["timed"]]
    wire = {"allowed": sorted(spec["allowed"]), "cases": [[_encode(a), _encode(b)] for a, b in spec["cases"]],
            "timed": [[_encode(a), _encode(b)] for a, b in spec["timed"]]}  # fmt: skip
    report_bytes = sum(len(a) * len(b[0]) * 11 + 64 for a, b in calls) + 8192  # base64 doubles + framing
    result = run_python(
        HARNESS,
        stdin=f"{nonce}\n{json.dumps(wire)}",
        files={"solution.py": code},
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_output_bytes=max(1_000_000, 2 * report_bytes),
    )
    if not result.ok:  # a harness that did not exit 0 is a crash, whatever it printed
        tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
        how = result.error_kind or f"exit {result.exit_code}"
        return None, f"the run crashed ({how})" + (f": {tail[0][:200]}" if tail else "")
    lines = [line for line in result.stdout.splitlines() if line.startswith(nonce + " ")]
    if len(lines) != 1:
        return None, "the run ended without a report" if not lines else "the run wrote more than one report"
    try:
        report = json.loads(lines[0][len(nonce) + 1 :])
        if set(report) == {"error"} and type(report["error"]) is str:
            return {"error": report["error"][:500] or "error"}, ""
        if set(report) != {"outputs", "elapsed"} or len(report["outputs"]) != len(calls):
            raise ValueError("bad report keys")
        outputs = [_decode(item, (len(a), len(b[0]))) for item, (a, b) in zip(report["outputs"], calls, strict=True)]
        elapsed = report["elapsed"]
        if len(elapsed) != len(spec["timed"]) or not all(type(t) is float and 0 < t < math.inf for t in elapsed):
            raise ValueError("bad times")
    except (ValueError, TypeError, KeyError, MemoryError):
        return None, "unreadable harness report"
    return {"outputs": outputs, "elapsed": elapsed}, ""


def evaluate_matmul(
    code: str,
    *,
    size: int = 64,
    rounds: int = 2,
    repeats: int = 3,
    target_speedup: float = 2.0,
    timeout_s: float = 20.0,
    memory_mb: int = 1024,
    allowed_imports: frozenset[str] | set[str] = SAFE_IMPORTS,
    static_check: bool = True,
) -> MatmulEval:
    """Grade one submission (see the module docstring). ``static_check=False`` skips the AST gate, to test the
    run-time defences alone."""
    if size < 2 or rounds < 1 or repeats < 1 or target_speedup <= 1.0:
        raise ValueError(f"matmul: need size >= 2, rounds >= 1, repeats >= 1, target_speedup > 1; got {size=}, "
                         f"{rounds=}, {repeats=}, {target_speedup=}")  # fmt: skip
    ev = MatmulEval()
    report = check_code(code, allowed_imports=allowed_imports)
    ev.parses = report.parses
    if not report.parses:
        ev.reason = f"does not parse: {report.syntax_error}"
        return ev
    ev.violations = report.violations
    ev.clean = not report.violations
    if static_check and not ev.clean:
        ev.reason = "forbidden: " + "; ".join(report.violations[:3])
        return ev
    if "matmul" not in report.functions:
        ev.reason = "the code defines no top-level matmul"
        return ev
    rng = random.Random(secrets.randbits(64))  # fresh inputs on every call: no answer can be cached

    def timed() -> list[tuple[list, list]]:
        return [(_matrix(rng, size, size, True), _matrix(rng, size, size, True)) for _ in range(repeats)]

    allowed = sorted(allowed_imports)
    for r in range(rounds):
        cases, pairs = (_cases(rng) if r == 0 else []), timed()
        out, why = _run_harness(code, {"allowed": allowed, "cases": cases, "timed": pairs}, timeout_s, memory_mb)
        if out is None or "error" in out:
            ev.runs = ev.correct = False
            ev.speedup = None
            ev.reason = out["error"] if out is not None else why
            return ev
        ev.runs = True
        for (a, b), got in zip([*cases, *pairs], out["outputs"], strict=True):
            if not _close(got, _product(a, b)):
                ev.correct, ev.speedup = False, None
                ev.reason = f"wrong result for a {len(a)}x{len(b)} @ {len(b)}x{len(b[0])} product" + (
                    f" (returned {got[0]}x{got[1] if got[1] >= 0 else '?'})" if isinstance(got, tuple) else ""
                )
                return ev
        if min(out["elapsed"]) < size**3 * MIN_SECONDS_PER_MULADD:
            ev.runs = ev.correct = False
            ev.reason = f"impossible timing ({min(out['elapsed'])!r} s for {size}^3 multiply-adds)"
            return ev
        ev.correct = True
        ev.times_s += out["elapsed"]
        base, why = _run_harness(NAIVE, {"allowed": [], "cases": [], "timed": timed()}, timeout_s, memory_mb)
        if base is None or "error" in base:
            raise RuntimeError(f"matmul: the naive baseline failed to run ({why or base['error']})")
        ev.baseline_times_s += base["elapsed"]
    # The minimum: noise (other processes, frequency changes) only ever adds time.
    ev.speedup = min(ev.baseline_times_s) / min(ev.times_s)
    ev.reason = f"correct, {ev.speedup:.2f}x the naive loop"
    return ev


def fast_score(speedup: float | None, target: float) -> float:
    if speedup is None:
        return 0.0
    return min(1.0, max(0.0, (speedup - 1.0) / (target - 1.0)))


@register_task
class Matmul(Task):
    """``matmul``: options ``size`` (timed matrices, 64), ``rounds`` (processes, 2), ``repeats`` (timed calls in
    each, 3), ``target_speedup`` (2.0:
    full ``fast`` reward), ``timeout_s``, ``memory_mb``, ``n_train``/``n_eval`` (rows; the prompt is the same,
    GRPO samples a group per row), ``workers`` (submissions graded at once). Rewards ``parses`` (0.1), ``runs``
    (0.1), ``correct`` (1.0), ``fast`` (0.5), ``clean`` (1.0; -1 for a violation)."""

    name = "matmul"
    default_instructions = "You write fast, correct Python."

    def __init__(
        self,
        *,
        size: int = 64,
        rounds: int = 2,
        repeats: int = 3,
        target_speedup: float = 2.0,
        timeout_s: float = 20.0,
        memory_mb: int = 1024,
        n_train: int = 256,
        n_eval: int = 16,
        workers: int = 2,
        **common: Any,
    ) -> None:
        if workers < 1:
            raise ValueError(f"task matmul: workers must be >= 1, got {workers}")
        self.options = {"size": size, "rounds": rounds, "repeats": repeats, "target_speedup": target_speedup,
                        "timeout_s": timeout_s, "memory_mb": memory_mb}  # fmt: skip
        evaluate_matmul("", **self.options)  # checks the options now (an empty submission fails to define matmul)
        self.n_train, self.n_eval, self.workers = n_train, n_eval, workers
        self._cache: OrderedDict[int, tuple[ParsedCompletion, MatmulEval]] = OrderedDict()
        self._lock = threading.Lock()
        super().__init__(**common)

    def load_split(self, split: str) -> list[dict[str, Any]]:
        return [{"id": i} for i in range(self.n_eval if split == "eval" else self.n_train)]

    def user_message(self, row: dict[str, Any]) -> str:
        allowed = ", ".join(sorted(SAFE_IMPORTS - {"__future__"}))
        return MATMUL_PROMPT.format(allowed=allowed, size=self.options["size"])

    def evaluate(self, completion: ParsedCompletion) -> MatmulEval:
        """The grade of one completion, computed once per completion object and shared by the five rewards."""
        with self._lock:
            hit = self._cache.get(id(completion))
            if hit is not None and hit[0] is completion:
                return hit[1]
        ev = evaluate_matmul(extract_code(completion.final_text), **self.options)
        with self._lock:
            self._cache[id(completion)] = (completion, ev)  # holding the object keeps its id from being reused
            while len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return ev

    def reward_definitions(self) -> dict[str, Reward]:
        target = self.options["target_speedup"]
        grade = self.evaluate

        def make(name: str, weight: float, value: Any) -> Reward:
            fn = per_sample(lambda prompt, completion, **_: value(grade(completion)), workers=self.workers)
            return Reward(name, fn, weight)

        return {
            "parses": make("parses", 0.1, lambda ev: float(ev.parses)),
            "runs": make("runs", 0.1, lambda ev: float(ev.runs)),
            "correct": make("correct", 1.0, lambda ev: float(ev.correct)),
            "fast": make("fast", 0.5, lambda ev: fast_score(ev.speedup, target) if ev.correct else 0.0),
            "clean": make("clean", 1.0, lambda ev: 0.0 if ev.clean else -1.0),
        }
