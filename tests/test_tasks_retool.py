"""retool: the python tool through the sandbox, a full tool round trip, truncation to the budget."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from test_tasks_common import GSM8K_TRAIN, tiny_tokenizer

from ossrl.harmony import Message, render_completion, render_messages
from ossrl.tasks import get_task, parse_episode
from ossrl.tasks.retool import truncate_middle

pytestmark = pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"{GSM8K_TRAIN} is not here")


@pytest.fixture(scope="module")
def task():
    return get_task("retool", path=str(GSM8K_TRAIN), limit=20, eval_size=0, timeout_s=5, max_output_chars=300)


def test_tool_round_trip(task):
    """The policy calls python, the result is appended as the engine does, the policy answers: reward 1."""
    tok = tiny_tokenizer()
    row = task.rows("train")[0]  # Natalia's clips: 72
    call = render_completion([Message.analysis("let me compute"),
                              Message.tool_call("python", {"code": "print(48 + 48 // 2)"})], tok)  # fmt: skip
    first = parse_episode(call, tok)
    assert first.ended == "call" and first.tool_call.name == "python"
    result = task.call_tool(first.tool_call)
    assert result.strip() == "72"
    appended = render_messages([Message.tool_result("functions.python", result, namespace="")], tok,
                               add_generation_prompt=True)  # fmt: skip
    episode = call + appended + render_completion([Message.final("#### 72")], tok)
    out = task.score([row], [episode], tokenizer=tok)
    assert out.values == {"correct": [1.0], "format": [1.0], "tool_calls": [1.0]}
    wrong = call + appended + render_completion([Message.final("#### 71")], tok)
    assert task.score([row], [wrong], tokenizer=tok).values["correct"] == [0.0]


def test_python_tool_errors_and_budget(task):
    assert task.call_tool("python", {"code": "1/0"}).startswith("error: runtime")
    assert "ZeroDivisionError" in task.call_tool("python", {"code": "1/0"})
    assert task.call_tool("python", {"code": "x = 1"}) == "(no output)"
    assert task.call_tool("python", {"code": ""}).startswith("error: no code")
    assert task.call_tool("python", {"cmd": "ls"}).startswith("error: unexpected argument")
    assert task.call_tool("python", "print('raw code, as the built-in python tool sends it')").startswith("raw code")
    long = task.call_tool("python", {"code": "print('a' * 5000 + 'END')"})
    assert len(long) < 400 and long.rstrip().endswith("END") and "characters cut" in long


def test_python_tool_limits_hold(task):
    quick = get_task("retool", path=str(GSM8K_TRAIN), limit=5, timeout_s=1)
    out = quick.call_tool("python", {"code": "while True: pass"})
    assert out.startswith("error: timeout")
    secret = task.call_tool("python", {"code": "import os; print(sorted(os.environ))"})
    assert "HOME" in secret and "OSSRL" not in secret and "PYTEST" not in secret


def test_python_tool_is_async_for_the_engine(task):
    fn = task.tool_functions["python"]
    assert inspect.iscoroutinefunction(fn)

    async def many():
        return await asyncio.gather(*(task.acall_tool("python", {"code": f"print({i} * {i})"}) for i in range(4)))

    assert [r.strip() for r in asyncio.run(many())] == ["0", "1", "4", "9"]


def test_truncate_middle():
    assert truncate_middle("short", 100) == "short"
    cut = truncate_middle("x" * 1000 + "tail", 120)
    assert cut.endswith("tail") and "characters cut" in cut and len(cut) < 200


def test_bad_options():
    with pytest.raises(ValueError, match="max_output_chars"):
        get_task("retool", max_output_chars=5)
