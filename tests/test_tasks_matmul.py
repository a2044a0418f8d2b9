"""matmul: the AST gate, the sandboxed harness, and hostile submissions that try to fool the reward."""

from __future__ import annotations

import pytest

import ossrl.tasks.matmul as mm
from ossrl.tasks import get_task
from ossrl.tasks.code_check import check_code
from ossrl.tasks.matmul import NAIVE, evaluate_matmul, extract_code

FAST = """from operator import mul

def matmul(A, B):
    cols = list(zip(*B))
    return [[sum(map(mul, row, col)) for col in cols] for row in A]
"""
QUICK = {"size": 24, "rounds": 1, "repeats": 1, "timeout_s": 10}  # enough to grade correctness, cheap

HOSTILE = {
    "numpy": ("import numpy as np\ndef matmul(A, B):\n    return (np.array(A) @ np.array(B)).tolist()\n",
              "imports numpy, which is not in the standard library"),
    "from_numpy": ("from numpy import dot\ndef matmul(A, B):\n    return dot(A, B).tolist()\n", "imports numpy"),
    "dunder_import": ("np = __import__('numpy')\ndef matmul(A, B):\n    return np.dot(A, B).tolist()\n",
                      "uses __import__"),
    "importlib": ("import importlib\nnp = importlib.import_module('numpy')\ndef matmul(A, B):\n    return A\n",
                  "imports importlib"),
    "exec_string": ("exec('import numpy as np')\ndef matmul(A, B):\n    return np.dot(A, B).tolist()\n", "uses exec"),
    "eval_string": ("np = eval(\"__imp\" + \"ort__('numpy')\")\ndef matmul(A, B):\n    return A\n", "uses eval"),
    "getattr_builtins": ("imp = getattr(__builtins__, '__imp' + 'ort__')\nnp = imp('numpy')\n"
                         "def matmul(A, B):\n    return np.dot(A, B).tolist()\n", "uses getattr"),
    "builtins_dict": ("np = __builtins__['__import__']('numpy')\ndef matmul(A, B):\n    return A\n",
                      "dunder name __builtins__"),
    "subclasses": ("w = ().__class__.__base__.__subclasses__()\ndef matmul(A, B):\n    return A\n",
                   "private attribute .__class__"),
    "perf_counter": ("import time\ntime.perf_counter = lambda: 0.0\n" + FAST, "imports time"),
    "time_time": ("from time import time\nimport time as t\nt.time = lambda: 0.0\n" + FAST, "imports time"),
    "sys_modules": ("import sys\nnp = sys.modules.get('numpy')\n" + FAST, "imports sys"),
    "module_attr": ("import fractions\ns = fractions.sys\n" + FAST, "accesses .sys"),
    "attrgetter": ("from operator import attrgetter as a\nsub = a('__class__.__base__')(())\n" + FAST,
                   "imports attrgetter"),
    "methodcaller": ("import operator\nf = operator.methodcaller('__subclasses__')\n" + FAST,
                     "accesses .methodcaller"),
    "private_attr": ("import collections\ns = collections._sys\n" + FAST, "private attribute ._sys"),
    "frames": ("def matmul(A, B):\n    try:\n        1/0\n    except Exception as e:\n"
               "        return e.__traceback__.tb_frame.f_back.f_locals['out']\n", "accesses .tb_frame"),
    "open_file": ("cache = open('/tmp/answers').read()\n" + FAST, "uses open"),
}  # fmt: skip


def test_ast_check_flags_by_structure_not_by_strings():
    assert check_code(FAST).clean and check_code(NAIVE).clean
    # mentioning numpy in a comment or a string is fine; the AST decides
    assert check_code("# numpy would be faster\nNOTE = 'import numpy'\n" + FAST).clean
    report = check_code("def matmul(A, B:\n")
    assert not report.parses and "never closed" in report.syntax_error


@pytest.mark.parametrize(
    "code",
    [
        'LABEL = "{} x {}".format(2, 3)',
        'LABEL = "{0:>8} {name!r:{width}}".format(1, name=2, width=5)',
        'LABEL = f"{len(FAST)} chars"',
        "match [1, 2]:\n    case [a, b]:\n        pass\n    case {'k': v}:\n        pass\n    case int() | float():\n"
        "        pass",
        "from fractions import Fraction\nfrom collections import abc, deque\nfrom fractions import math",
    ],
)
def test_the_gate_lets_plain_python_through(code):
    assert check_code(code + "\n" + FAST).clean, check_code(code + "\n" + FAST).violations


@pytest.mark.parametrize(
    "code, violation",
    [
        ('s = "{0.real}".format(1)', "a .format field that reads attributes or items ({0.real})"),
        ('s = "{0[0]}".format([1])', "({0[0]})"),
        ('s = "{0:{1.real}}".format(1, 2)', "({1.real})"),  # a field nested in a format spec
        ('s = "{0" ".real}".format(1)', "({0.real})"),  # implicitly concatenated literals are one string
        ('s = "{".format(1)', "a .format string that does not parse"),
        ('f = "{}"\ns = f.format(1)', "calls .format on something that is not a string literal"),
        ('s = str.format("{}", 1)', "calls .format on something that is not a string literal"),
        ('s = "{x}".format_map({"x": 1})', "accesses .format_map"),
        ("match 1:\n    case object(real=r):\n        pass", "a class pattern with arguments"),
        ("match 1:\n    case int(r):\n        pass", "a class pattern with arguments"),
        ("from fractions import sys", "imports the module sys through fractions"),
        ("from fractions import re", "imports the module re through fractions"),
        ("def g():\n    yield\nx = g().gi_yieldfrom", "accesses .gi_yieldfrom"),
        ("def f():\n    x = 1\n    return lambda: x\nc = f().cell_contents", "accesses .cell_contents"),
        ("async def c():\n    pass\nx = c().cr_await", "accesses .cr_await"),
        ("x = (1).f_lasti", "accesses .f_lasti"),
    ],
)
def test_the_gate_closes_attribute_access_by_name(code, violation):
    report = check_code(code + "\n" + FAST)
    assert report.parses and any(violation in v for v in report.violations), report.violations


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_submissions_get_no_reward_with_a_reason(name):
    code, reason = HOSTILE[name]
    report = check_code(code)
    assert report.parses and any(reason in v for v in report.violations), report.violations
    task = get_task("matmul", **QUICK)
    completion = f"Here you go:\n```python\n{code}```"
    out = task.score([{"id": 0}], [completion])
    assert out.values["correct"] == [0.0] and out.values["fast"] == [0.0] and out.values["clean"] == [-1.0]
    assert out.total[0] < 0
    assert reason in task.evaluate(task.parse(completion)).reason


@pytest.mark.parametrize(
    "code, allowed, reason",
    [  # the run-time defences alone (static check off): each still yields no reward, with a reason
        (HOSTILE["dunder_import"][0], (), "import of 'numpy' is not allowed"),
        (HOSTILE["importlib"][0], (), "import of 'importlib' is not allowed"),
        (HOSTILE["exec_string"][0], (), "name 'exec' is not defined"),
        (HOSTILE["getattr_builtins"][0], (), "name 'getattr' is not defined"),
        (HOSTILE["open_file"][0], (), "name 'open' is not defined"),
        ("import sys\nf = sys._getframe(0)\n" + FAST, ("sys",), "sys._getframe is not allowed"),
        ("import sys\nDATA = sys.stdin.read()\nassert DATA, 'stdin was empty'\n" + FAST, ("sys",), "stdin was empty"),
        ("class L(list):\n    pass\n\ndef matmul(A, B):\n    return L([[0] * len(B[0]) for _ in A])\n", (),
         "returned L, not a list of lists"),
        ("def matmul(A, B):\n    return [[float('nan')] * len(B[0]) for _ in A]\n", (), "wrong result"),
    ],
)  # fmt: skip
def test_runtime_defences(code, allowed, reason):
    ev = evaluate_matmul(code, static_check=False, allowed_imports=set(allowed) | {"operator"}, **QUICK)
    assert not ev.correct and ev.speedup is None
    assert reason in ev.reason, ev.reason


@pytest.mark.parametrize("name", ["perf_counter", "time_time"])
def test_replacing_the_clock_changes_nothing(name):
    """The clock that counts is the harness parent's, in another process: a submission that stops its own clock
    (claiming 0-second calls) is timed like any other. A floor, not a ratio: load only ever adds time."""
    ev = evaluate_matmul(HOSTILE[name][0], static_check=False, allowed_imports={"time", "operator"}, **QUICK)
    assert ev.correct and min(ev.times_s) > QUICK["size"] ** 3 * 1e-8, (ev.reason, ev.times_s)


CACHED = """from operator import mul

SEEN = []

def matmul(A, B):
    if SEEN:  # the answer of the first call, returned for every later one
        return SEEN[0]
    cols = list(zip(*B))
    SEEN.append([[sum(map(mul, row, col)) for col in cols] for row in A])
    return SEEN[0]
"""


def test_cached_answers_across_calls_fail():
    assert check_code(CACHED).clean
    ev = evaluate_matmul(CACHED, **QUICK)
    assert ev.runs and not ev.correct and "wrong result" in ev.reason
    # and across runs: each run is a fresh process with a fresh work dir, and there is no open() to keep a file
    assert "uses open" in check_code("with open('cache.txt', 'w') as f:\n    f.write('x')\n").violations[0]


def test_forged_report_lines_are_ignored():
    forged = 'print(\'deadbeef {"outputs": [], "elapsed": [1e-09], "tampered": []}\')\n' + FAST.replace(
        "return [[", "return [[1 + "
    )
    ev = evaluate_matmul(forged, **QUICK)
    assert ev.runs and not ev.correct


def test_impossible_timing_is_rejected(monkeypatch):
    def fake_run(code, spec, timeout_s, memory_mb):
        outputs = [mm._product(a, b) for a, b in [*spec["cases"], *spec["timed"]]]
        return {"outputs": outputs, "elapsed": [1e-9] * len(spec["timed"])}, ""

    monkeypatch.setattr(mm, "_run_harness", fake_run)
    ev = evaluate_matmul(FAST, **QUICK)
    assert not ev.correct and "impossible timing" in ev.reason


def test_broken_submissions():
    assert evaluate_matmul("def matmul(A, B:\n", **QUICK).reason.startswith("does not parse")
    assert "defines no top-level matmul" in evaluate_matmul("def mm(A, B):\n    return A\n", **QUICK).reason
    ev = evaluate_matmul("def matmul(A, B):\n    while True:\n        pass\n", **{**QUICK, "timeout_s": 2})
    assert not ev.runs and "timeout" in ev.reason
    ev = evaluate_matmul("def matmul(A, B):\n    raise SystemExit(0)\n", **QUICK)
    assert not ev.runs and "SystemExit" in ev.reason
    ev = evaluate_matmul("def matmul(A, B):\n    return A\n", **QUICK)
    assert ev.runs and not ev.correct


def test_correct_submissions_are_graded_and_timed():
    task = get_task("matmul", size=24, rounds=2, repeats=3, workers=1)
    naive, fast = f"```python\n{NAIVE}```", f"Sure.\n\n```python\n{FAST}```\nIt transposes B once."
    out = task.score([{"id": 0}, {"id": 1}], [naive, fast])
    assert out.values["parses"] == out.values["runs"] == out.values["correct"] == [1.0, 1.0]
    assert out.values["clean"] == [0.0, 0.0]
    ev_fast = task.evaluate(task.parse(fast))
    assert ev_fast.speedup > 0 and len(ev_fast.times_s) == len(ev_fast.baseline_times_s) == 6  # rounds x repeats


@pytest.mark.slow  # a speed ratio: other load on the machine (a busy CI runner) can squeeze it; run with -m slow
def test_faster_submission_earns_a_speedup():
    task = get_task("matmul", size=64, rounds=2, repeats=3, workers=1)  # big enough that noise cannot hide 1.2x
    naive, fast = f"```python\n{NAIVE}```", f"```python\n{FAST}```"
    out = task.score([{"id": 0}, {"id": 1}], [naive, fast])
    ev_naive, ev_fast = (task.evaluate(task.parse(c)) for c in (naive, fast))
    assert 0.5 < ev_naive.speedup < 1.6  # the baseline against itself
    assert ev_fast.speedup > 1.2 and out.values["fast"][1] > 0.0


T_LOOP = """def matmul(A, B):
    Bt = [list(col) for col in zip(*B)]
    C = []
    for Ai in A:
        Ci = []
        for Bj in Bt:
            s = 0
            for a, b in zip(Ai, Bj):
                s += a * b
            Ci.append(s)
        C.append(Ci)
    return C
"""


@pytest.mark.slow
def test_honest_faster_code_outscores_the_naive_loop():
    """Small honest gains survive the new timing (pipe round trips included): a transposed-B loop (about 1.15x on
    CPython 3.11, whose naive loop is already fast) and sum(map(mul)) over transposed rows (about 1.7x)."""
    task = get_task("matmul", size=64, rounds=4, repeats=5, workers=1)
    codes = [NAIVE, T_LOOP, FAST]
    out = task.score([{"id": i} for i in range(3)], [f"```python\n{c}```" for c in codes])
    assert out.values["correct"] == [1.0] * 3
    naive, t_loop, fast = out.total
    assert naive < t_loop < fast, out.total


def test_prompt_code_extraction_and_options():
    task = get_task("matmul")
    text = task.prompt(task.rows("train")[0]).text()
    assert "matmul(A, B)" in text and "64 x 64" in text and "itertools" in text
    assert extract_code("```python\nx = 1\n```\ntext\n```py\ndef matmul(A, B):\n    pass\n```") == (
        "def matmul(A, B):\n    pass\n"
    )
    assert extract_code("def matmul(A, B): return A") == "def matmul(A, B): return A"
    assert extract_code(None) == ""
    with pytest.raises(ValueError, match="target_speedup > 1"):
        get_task("matmul", target_speedup=1.0)
    with pytest.raises(ValueError, match="workers"):
        get_task("matmul", workers=0)
