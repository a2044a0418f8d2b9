"""The task registry and interface: clear errors for unknown tasks, rewards, tools and options; prompts."""

from __future__ import annotations

import pytest
from test_tasks_common import tiny_tokenizer

from ossrl.harmony import ToolCall, parse_completion
from ossrl.tasks import Task, get_task, list_tasks, register_task, task_options
from ossrl.tasks.base import _TASKS


def test_all_tasks_are_registered():
    assert list_tasks() == ["arithmetic", "dataset", "gsm8k", "ifeval", "matmul", "retool"]


def test_unknown_task_suggests_a_name():
    with pytest.raises(ValueError, match=r"there is no task 'gsm8kk'; available: arithmetic, .*did you mean 'gsm8k'"):
        get_task("gsm8kk")


def test_unknown_option_lists_the_options():
    with pytest.raises(ValueError, match=r"task arithmetic has no option 'n_trian'.*did you mean 'n_train'"):
        get_task("arithmetic", n_trian=5)
    assert {"n_train", "rewards", "tools", "reasoning_effort", "seed"} <= set(task_options("arithmetic"))


def test_unknown_reward_and_bad_weights():
    with pytest.raises(ValueError, match=r"task gsm8k has no reward 'corect'; available: correct, format"):
        get_task("gsm8k", rewards=["corect"])
    with pytest.raises(TypeError, match="list of names"):
        get_task("gsm8k", rewards="correct")
    task = get_task("gsm8k", rewards={"correct": 2.0})
    assert [(r.name, r.weight) for r in task.rewards] == [("correct", 2.0)]


def test_tool_the_task_does_not_define():
    with pytest.raises(ValueError, match=r"task gsm8k does not define tool 'python'; it has no tools"):
        get_task("gsm8k", tools=["python"])
    with pytest.raises(ValueError, match=r"task arithmetic does not define tool 'python'; available: calculator"):
        get_task("arithmetic", tools=["python"])
    task = get_task("arithmetic")
    with pytest.raises(ValueError, match="does not define tool 'shell'"):
        task.call_tool("shell", {"cmd": "ls"})
    no_tools = get_task("arithmetic", tools=[])
    assert no_tools.tool_functions == {} and "type calculator" not in no_tools.prompt({"question": "1+1?"}).text()


def test_bad_common_options():
    with pytest.raises(ValueError, match="reasoning_effort='extreme'"):
        get_task("arithmetic", reasoning_effort="extreme")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        get_task("arithmetic").rows("dev")
    with pytest.raises(ValueError, match="need tokenizer="):
        get_task("arithmetic").score([{"answer": "1"}], [[5, 6, 7]])
    with pytest.raises(ValueError, match="1 rows for 2 completions"):
        get_task("arithmetic").score([{"answer": "1"}], ["1", "2"])


def test_prompt_render_and_tools_for_the_engine():
    tok = tiny_tokenizer()
    task = get_task("arithmetic", reasoning_effort="medium")
    row = task.rows("train")[0]
    prompt = task.prompt(row)
    text = prompt.text()
    assert "Reasoning: medium" in text and "type calculator" in text and row["question"] in text
    ids = task.render_prompt(row, tok)
    assert tok.decode(ids) == text
    assert set(task.tool_functions) == {"calculator"}
    assert "Current date" not in text  # prompts do not change from day to day
    short = get_task("arithmetic", system_message=False).render_prompt(row, tok)
    assert len(short) < len(ids)


def test_call_tool_from_a_parsed_call():
    tok = tiny_tokenizer()
    ids = tok.encode('<|channel|>commentary to=functions.calculator <|constrain|>json<|message|>{"expression": "6*7"}'
                     "<|call|>", add_special_tokens=False)  # fmt: skip
    call = parse_completion(ids, tok).tool_call
    assert isinstance(call, ToolCall)
    task = get_task("arithmetic")
    assert task.call_tool(call) == "42"
    assert task.call_tool("functions.calculator", {"expression": "2**10"}) == "1024"


def test_register_a_custom_task():
    @register_task
    class Echo(Task):
        name = "echo_test"

        def load_split(self, split):
            return [{"text": "hi", "gold": "hi"}]

        def user_message(self, row):
            return row["text"]

        def reward_definitions(self):
            from ossrl.tasks import Reward

            return {"same": Reward("same", lambda p, c, *, gold, **_: [float(x.final_text == g) for x, g in
                                                                        zip(c, gold, strict=True)])}  # fmt: skip

    try:
        task = get_task("echo_test")
        out = task.score(task.rows("train"), ["hi"])
        assert out.total == [1.0]
        with pytest.raises(ValueError, match="already registered"):

            @register_task
            class Other(Echo):
                pass

    finally:
        _TASKS.pop("echo_test")
