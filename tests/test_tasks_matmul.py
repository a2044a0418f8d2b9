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
        (HOSTILE["perf_counter"][0], ("time",), "tampered with the clock: replaced time.perf_counter"),
        (HOSTILE["time_time"][0], ("time",), "replaced time.time"),
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
        return {"outputs": outputs, "elapsed": [1e-9] * len(spec["timed"]), "tampered": []}, ""

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


def test_correct_submissions_and_speed():
    task = get_task("matmul", size=64, rounds=2, repeats=3, workers=1)  # big enough that noise cannot hide 1.2x
    naive, fast = f"```python\n{NAIVE}```", f"Sure.\n\n```python\n{FAST}```\nIt transposes B once."
    out = task.score([{"id": 0}, {"id": 1}], [naive, fast])
    assert out.values["parses"] == out.values["runs"] == out.values["correct"] == [1.0, 1.0]
    assert out.values["clean"] == [0.0, 0.0]
    ev_naive, ev_fast = (task.evaluate(task.parse(c)) for c in (naive, fast))
    assert 0.5 < ev_naive.speedup < 1.6  # the baseline against itself
    assert ev_fast.speedup > 1.2 and out.values["fast"][1] > 0.0
    assert len(ev_fast.times_s) == len(ev_fast.baseline_times_s) == 6  # rounds x repeats


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
