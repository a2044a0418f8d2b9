"""arithmetic: the safe calculator, seeded problems and splits, rewards, supervised demonstrations."""

from __future__ import annotations

import pytest
from test_tasks_common import final_ids, tiny_tokenizer

from ossrl.harmony import Message, render_completion
from ossrl.tasks import get_task, parse_episode
from ossrl.tasks.calculator import CalculatorError, calculator, safe_eval


@pytest.mark.parametrize(
    "expr, value",
    [("4821 * 37", 178377), ("(2 + 3) * -4", -20), ("7 / 2", 3.5), ("7 // 2", 3), ("2 ** 10", 1024),
     ("10 % 4", 2), ("1.5 + 1.5", 3.0), ("3 × 4", 12), ("2^3", 8)],
)  # fmt: skip
def test_calculator_evaluates(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize(
    "expr, why",
    [
        ("__import__('os').system('ls')", "not allowed"),
        ("().__class__.__bases__", "not allowed"),
        ("open('/etc/passwd')", "not allowed"),
        ("x + 1", "not allowed"),
        ("[1, 2]", "not allowed"),
        ("'a' * 3", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("1 if 1 else 2", "not allowed"),
        ("3and 4", "not allowed"),  # rejected before parsing: no SyntaxWarning printed
        ("9 ** 9 ** 9", "exponent"),
        ("10 ** 40", "exceeds"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 / 0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("", "empty"),
        ("1+" * 200 + "1", "longer than"),
        ("+".join(["1"] * 60), "more than"),
    ],
)
def test_calculator_rejects(expr, why):
    with pytest.raises(CalculatorError, match=why):
        safe_eval(expr)
    assert calculator(expr).startswith("error:")


def test_calculator_tool_text():
    assert calculator("6 / 3") == "2" and calculator("1 / 3") == "0.3333333333"
    assert calculator(None).startswith("error:") and calculator(expr="1").startswith("error: unexpected")


def test_problems_are_seeded_and_splits_disjoint():
    a, b = get_task("arithmetic", seed=1), get_task("arithmetic", seed=1)
    assert a.rows("train") == b.rows("train") and a.rows("eval") == b.rows("eval")
    assert a.rows("train") != get_task("arithmetic", seed=2).rows("train")
    train = {r["expression"] for r in a.rows("train")}
    assert len(train) == 2000 and not train & {r["expression"] for r in a.rows("eval")}
    for r in a.rows("eval")[:50]:
        assert int(r["answer"]) == safe_eval(r["expression"])
    big = get_task("arithmetic", min_digits=4, max_digits=5, operands=3, n_train=10)
    assert all(len(r["expression"].split()) == 5 for r in big.rows("train"))
    with pytest.raises(ValueError, match="min_digits"):
        get_task("arithmetic", min_digits=5, max_digits=3)
    with pytest.raises(ValueError, match="distinct problems"):
        get_task("arithmetic", min_digits=1, max_digits=1, n_train=500).rows("train")


def test_rewards_on_hand_written_completions():
    tok = tiny_tokenizer()
    task = get_task("arithmetic")
    row = {"question": "What is 12 * 34?", "expression": "12 * 34", "answer": "408"}
    cases = [
        final_ids("408"),
        final_ids("407"),
        final_ids("12 * 34 = 408"),  # right, but not the number only
        final_ids("408")[:-1],  # no <|return|>
        [],
        render_completion([Message.tool_call("calculator", {"expression": "12*34"})], tok),  # never answered
    ]
    out = task.score([row] * len(cases), cases, tokenizer=tok)
    assert out.values["correct"] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # a cut-off answer is no answer
    assert out.values["format"] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert out.values["tool_calls"] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_demonstrations_render_as_the_engine_would():
    tok = tiny_tokenizer()
    task = get_task("arithmetic", seed=5)
    demos = task.demonstrations(40, tool_fraction=0.25)
    assert demos == task.demonstrations(40, tool_fraction=0.25)
    assert sum(d["uses_tool"] for d in demos) == 10
    train = {r["expression"] for r in task.rows("train")}
    assert all(d["expression"] in train for d in demos)
    rows, completions = [], []
    for d in demos:
        r = task.render_demonstration(d, tok)
        assert len(r["completion_ids"]) == len(r["loss_mask"])
        assert r["prompt_ids"] == task.render_prompt(d, tok)
        parsed = parse_episode(r["completion_ids"], tok)
        assert parsed.ok and parsed.final_text == d["answer"]
        if d["uses_tool"]:
            assert 0 in r["loss_mask"] and parsed.messages[1].content == d["answer"]  # the tool result
        else:
            assert set(r["loss_mask"]) == {1}
        rows.append(d)
        completions.append(r["completion_ids"])
    out = task.score(rows, completions, tokenizer=tok)
    assert out.means()["correct"] == 1.0 and out.means()["format"] == 1.0
    with pytest.raises(ValueError, match="tool_fraction"):
        task.demonstrations(2, tool_fraction=2.0)
