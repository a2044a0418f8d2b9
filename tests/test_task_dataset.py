"""The generic ``dataset`` task: files and in-memory data, splits, chat prompts, TRL-style reward functions (what
they receive, None, raising, weights, accuracy), ``module:function`` imports and their errors, tools from functions."""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Literal

import pytest
from test_tasks_common import tiny_tokenizer

from ossrl.config import load_config
from ossrl.harmony import Message, render_completion
from ossrl.tasks import get_task
from ossrl.tasks.dataset import DatasetFileError, answer_text, load_function, read_data_file, tool_from_function


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_module(directory, name, source):
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


ROWS = [{"prompt": f"What is {i} + {i}?", "answer": 2 * i, "level": i % 3} for i in range(20)]

RECORDING = """
    CALLS = []

    def correct(prompts, completions, completion_ids, answer, **kwargs):
        CALLS.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                          **kwargs))
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    def only_even(completions, level):
        return [None if lv % 2 else 0.5 for lv in level]
"""


def zero(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def ids(*messages):
    return render_completion(list(messages), tiny_tokenizer())


def test_rewards_receive_trl_arguments_and_only_a_finished_final_answer(workdir):
    write_jsonl(workdir / "data.jsonl", ROWS)
    write_module(workdir, "rec_rewards", RECORDING)
    task = get_task("dataset", path="data.jsonl", rewards=["rec_rewards:correct", "rec_rewards:only_even"])
    assert [r.name for r in task.rewards] == ["correct", "only_even"]
    train, held = task.rows("train"), task.rows("eval")
    assert (len(train), len(held)) == (19, 1)  # min(100, 5% rounded up) held out, seeded
    assert held == get_task("dataset", path="data.jsonl", rewards=["rec_rewards:correct"]).rows("eval")
    assert held != get_task("dataset", path="data.jsonl", rewards=["rec_rewards:correct"], seed=3).rows("eval")
    row = next(r for r in train if r["answer"] == 4)
    completions = [
        ids(Message.analysis("2 + 2 = 4"), Message.final("4")),  # a proper answer
        ids(Message.analysis("the answer is 4")),  # an answer in the analysis, no final: nothing to score
        ids(Message.final("4"), Message.analysis("more"))[:-1],  # a final, then more text: not the ending answer
        ids(Message.final("4"))[:-3],  # a final answer cut off before <|return|>
    ]
    out = task.score([row] * 4, completions, tokenizer=tiny_tokenizer())
    call = __import__("rec_rewards").CALLS[-1]
    assert call["prompts"] == [row["prompt"]] * 4
    assert call["completions"] == ["4", "", "", ""]
    assert call["completion_ids"] == [list(c) for c in completions]
    assert all(isinstance(t, int) for c in call["completion_ids"] for t in c)
    assert call["answer"] == [4] * 4 and call["level"] == [row["level"]] * 4  # every other column, aligned
    assert "prompt" not in call  # TRL's rule
    assert out.values["correct"] == [1.0, 0.0, 0.0, 0.0]
    assert out.values["only_even"] == ([None] * 4 if row["level"] % 2 else [0.5] * 4)
    # Strings are final answers as given (offline scoring): completion_ids is None then.
    task.score([row], ["4"])
    assert __import__("rec_rewards").CALLS[-1]["completion_ids"] == [None]


def test_answer_text_is_the_final_message_that_ended_the_episode():
    from ossrl.harmony import ParsedCompletion

    final = Message.final("42")
    assert answer_text(ParsedCompletion([Message.analysis("x"), final], ended="return")) == "42"
    assert answer_text(ParsedCompletion([final], ended="truncated")) == ""
    assert answer_text(ParsedCompletion([final, Message.analysis("x")], ended="return")) == ""
    assert answer_text(ParsedCompletion([final, Message.tool_call("f", {})], ended="call")) == ""


def test_reward_none_weights_numpy_and_accuracy_is_correct_else_the_first():
    np = pytest.importorskip("numpy")
    rows = [{"prompt": "a", "gold": "x"}, {"prompt": "b", "gold": None}]

    def match(completions, gold, **_):
        return np.array(
            [None if g is None else float(c == g) for c, g in zip(completions, gold, strict=True)], dtype=object
        )

    def length(completions, **_):
        return [np.float32(len(c)) for c in completions]

    task = get_task("dataset", path=rows, rewards=[match, length], reward_weights=[3, 1], eval_split="train")
    out = task.score(rows, ["x", "yy"])
    assert out.values == {"match": [1.0, None], "length": [1.0, 2.0]}
    assert out.total == [(3 * 1.0 + 1.0) / 4, 2.0]  # a reward that does not apply leaves both sums
    assert task.accuracy_reward == "match"  # no reward named correct: the first
    from ossrl.train.evaluate import accuracy_reward

    assert accuracy_reward(task, out.values) == "match"

    def correct(completions, **_):
        return [0.0] * len(completions)

    named = get_task("dataset", path=rows, rewards=[length, correct, lambda completions, **_: [1] * 2, length])
    assert [r.name for r in named.rewards] == ["length", "correct", "reward_3", "length_2"]
    assert named.accuracy_reward == "correct"
    with pytest.raises(ValueError, match=r"1 reward_weights for 2 rewards"):
        get_task("dataset", path=rows, rewards=[match, length], reward_weights=[1])


def test_a_reward_that_raises_scores_its_samples_zero(caplog):
    rows = [{"prompt": "a", "n": 1}, {"prompt": "b", "n": 0}]

    def inverse(completions, n, **_):
        return [1 / v for v in n]

    def broken(completions, **_):
        raise RuntimeError("bug in my reward")

    task = get_task("dataset", path=rows, rewards=[inverse, broken], eval_split="train")
    out = task.score(rows, ["x", "y"])
    assert out.values["inverse"] == [1.0, 0.0] and out.errors == {"inverse": 1, "broken": 2}
    assert "ZeroDivisionError" in caplog.text and "bug in my reward" in caplog.text


def test_a_reward_needing_a_column_the_data_lacks_fails_when_the_task_is_built():
    def needs_gold(completions, gold):
        return [0.0] * len(completions)

    with pytest.raises(
        ValueError,
        match=r"reward 'needs_gold' needs argument\(s\) \['gold'\] that no column of the "
        r"train split supplies; it gets prompts, completions, completion_ids and the columns: answer",
    ):
        get_task("dataset", path=[{"prompt": "a", "answer": 1}], rewards=[needs_gold])
    with pytest.raises(ValueError, match=r"no column of the eval split supplies"):
        get_task("dataset", path=[{"prompt": "a", "gold": 1}], rewards=[needs_gold], eval_split=[{"prompt": "b"}])


def test_chat_prompts_render_as_harmony_and_reach_rewards_as_given():
    seen = []

    def record(prompts, completions, **_):
        seen.extend(prompts)
        return [0.0] * len(completions)

    chat = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr."}, {"role": "user", "content": "Bye"}]  # fmt: skip
    rows = [{"prompt": chat}, {"prompt": [{"role": "user", "content": "Plain"}]}, {"prompt": "Text"}]
    task = get_task("dataset", path=rows, rewards=[record], system="Be brief.", eval_split="train")
    pirate = task.prompt(task.rows("train")[0]).text()
    assert "# Instructions\n\nTalk like a pirate." in pirate and "Be brief." not in pirate  # the row's own wins
    assert "<|start|>user<|message|>Hi<|end|>" in pirate and "<|channel|>final<|message|>Arr." in pirate
    assert pirate.endswith("<|start|>user<|message|>Bye<|end|><|start|>assistant")
    for row in task.rows("train")[1:]:
        assert "# Instructions\n\nBe brief." in task.prompt(row).text()
    tok = tiny_tokenizer()
    assert tok.decode(task.render_prompt(task.rows("train")[0], tok)) == pirate
    task.score(rows, ["a", "b", "c"])
    assert seen == [chat, rows[1]["prompt"], "Text"]


def test_bad_prompts_are_skipped_and_a_missing_column_is_named(caplog):
    rows = [{"prompt": "ok"}, {"prompt": ""}, {"prompt": [{"role": "robot", "content": "x"}]}, {"prompt": 3},
            {"question": "no prompt"}, {"prompt": [{"role": "system", "content": "only system"}]}]  # fmt: skip
    task = get_task("dataset", path=rows, rewards=[zero], eval_split="train")
    assert task.rows("train") == [{"prompt": "ok"}]
    assert "skipped 5 of 6 rows" in caplog.text and "role 'robot'" in caplog.text
    with pytest.raises(ValueError, match=r"has no column 'text' \(prompt_column\); columns: prompt, question"):
        get_task("dataset", path=rows, rewards=[zero], prompt_column="text")
    with pytest.raises(ValueError, match=r"a column may not be named 'completions'"):
        get_task("dataset", path=[{"prompt": "a", "completions": 1}], rewards=[zero])


def test_module_function_errors_name_what_was_looked_for(workdir):
    write_module(workdir, "err_rewards", "def correct(completions, **kw):\n    return [0.0] * len(completions)\n"
                 "VALUE = 3\n")  # fmt: skip
    write_module(workdir, "broken_module", "def f(:\n")
    rows = [{"prompt": "a"}]
    with pytest.raises(ValueError, match=r"no module 'nope_rewards': looked in the working directory .*"
                       r"\(for nope_rewards.py\) and among the installed packages"):  # fmt: skip
        get_task("dataset", path=rows, rewards=["nope_rewards:correct"])
    with pytest.raises(ValueError, match=r"module 'err_rewards' \(.*err_rewards.py\) has no function 'corect'; "
                       r"available: correct .*did you mean 'correct'"):  # fmt: skip
        get_task("dataset", path=rows, rewards=["err_rewards:corect"])
    with pytest.raises(ValueError, match=r"err_rewards.VALUE .* is a int, not a function"):
        get_task("dataset", path=rows, rewards=["err_rewards:VALUE"])
    with pytest.raises(ValueError, match=r"expected 'module:function'"):
        get_task("dataset", path=rows, rewards=["err_rewards"])
    with pytest.raises(ValueError, match=r"'err_rewards.py' is a file name; name the module: 'err_rewards:correct'"):
        get_task("dataset", path=rows, rewards=["err_rewards.py:correct"])
    with pytest.raises(ValueError, match=r"importing module 'broken_module' raised SyntaxError"):
        get_task("dataset", path=rows, rewards=["broken_module:f"])
    with pytest.raises(ValueError, match=r"rewards= is required"):
        get_task("dataset", path=rows)
    with pytest.raises(ValueError, match=r"path= is required"):
        get_task("dataset", rewards=["err_rewards:correct"])
    with pytest.raises(TypeError, match=r"without a space after the colon"):
        get_task("dataset", path=rows, rewards={"err_rewards": "correct"})
    # An installed module works too; the working directory wins over one not imported yet.
    assert load_function("json:dumps") is json.dumps
    assert "tabnanny" not in sys.modules
    write_module(workdir, "tabnanny", "def check(**kw):\n    return 'local'\n")
    assert load_function("tabnanny:check")() == "local"
    write_module(workdir, "string", "def capwords(**kw):\n    return 'local'\n")
    with pytest.raises(ValueError, match=r"has string.py, but a module 'string' is already imported from .*rename"):
        load_function("string:capwords")


def test_modules_of_the_same_name_in_two_folders(tmp_path, monkeypatch):
    for name, value in (("one", 1.0), ("two", 2.0)):
        (tmp_path / name).mkdir()
        write_module(tmp_path / name, "same_name_rewards", f"def r(completions, **k):\n    return [{value}]\n")
    for name, value in (("one", 1.0), ("two", 2.0)):
        monkeypatch.chdir(tmp_path / name)
        assert load_function("same_name_rewards:r")(completions=["x"]) == [value]


def test_cli_and_yaml_forms_of_the_options(workdir):
    write_jsonl(workdir / "data.jsonl", ROWS)
    write_module(workdir, "yaml_rewards", RECORDING)
    cfg = load_config(None, ["task.name=dataset", "task.options={path: data.jsonl, rewards: [yaml_rewards:correct, "
                             "yaml_rewards:only_even], reward_weights: [1, 0.5]}"])  # fmt: skip
    assert cfg.task.options["rewards"] == ["yaml_rewards:correct", "yaml_rewards:only_even"]
    task = get_task(cfg.task.name, **cfg.task.options)
    assert [(r.name, r.weight) for r in task.rewards] == [("correct", 1.0), ("only_even", 0.5)]
    one = get_task("dataset", path="data.jsonl", rewards="yaml_rewards:correct,yaml_rewards:only_even")  # --option
    assert [r.name for r in one.rewards] == ["correct", "only_even"]


def test_data_files_that_cannot_be_read_name_the_file_and_line(workdir):
    bad_utf8 = workdir / "bad_utf8.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetFileError, match=r"bad_utf8.jsonl:3: not UTF-8 text: byte 0xe9"):
        read_data_file(bad_utf8)
    bad_json = workdir / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    with pytest.raises(DatasetFileError, match=r"bad.jsonl:3: not valid JSON: Expecting property name .*column 16"):
        get_task("dataset", path="bad.jsonl", rewards=[zero])  # fails when the task is built
    not_object = workdir / "list.jsonl"
    not_object.write_text('{"prompt": "a"}\n["prompt"]\n')
    with pytest.raises(DatasetFileError, match=r"list.jsonl:2: a line must be a JSON object"):
        read_data_file(not_object)
    (workdir / "bad.json").write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    with pytest.raises(DatasetFileError, match=r"bad.json:3: not valid JSON"):
        read_data_file(workdir / "bad.json")
    (workdir / "bad.csv").write_text('prompt,answer\n"a, b",1\nc,2,3\n')
    with pytest.raises(DatasetFileError, match=r"bad.csv:3: 3 fields; the header has 2"):
        read_data_file(workdir / "bad.csv")
    with pytest.raises(FileNotFoundError, match=r"dataset 'missing.jsonl': no such file"):
        get_task("dataset", path="missing.jsonl", rewards=[zero])
    with pytest.raises(FileNotFoundError, match=r"no such file or folder"):
        get_task("dataset", path="./missing_folder", rewards=[zero])


def test_file_kinds_folders_splits_and_in_memory_datasets(workdir):
    (workdir / "data.csv").write_text('prompt,answer,note\n"What is 1, plus 1?",2,\nWhat is 2.5 * 2?,5.0,x\n')
    assert read_data_file(workdir / "data.csv") == [
        {"prompt": "What is 1, plus 1?", "answer": 2.0, "note": None},
        {"prompt": "What is 2.5 * 2?", "answer": 5.0, "note": "x"},
    ]
    (workdir / "cols.json").write_text(json.dumps({"prompt": ["a", "b"], "answer": [1, 2]}))
    assert read_data_file(workdir / "cols.json") == [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), workdir / "data.parquet")
    assert read_data_file(workdir / "data.parquet") == ROWS
    folder = workdir / "hub_like"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-00000.jsonl", ROWS[:12])
    write_jsonl(folder / "test.jsonl", ROWS[12:])
    task = get_task("dataset", path="hub_like", rewards=[zero], eval_split="test")
    assert task.rows("train") == ROWS[:12] and task.rows("eval") == ROWS[12:]
    with pytest.raises(ValueError, match=r"no data files for split 'validation'; splits found: test, train"):
        get_task("dataset", path="hub_like", rewards=[zero], eval_split="validation")
    write_jsonl(workdir / "eval.jsonl", ROWS[:3])
    task = get_task("dataset", path="data.parquet", rewards=[zero], eval_split="eval.jsonl", limit=5)
    assert task.rows("train") == ROWS[:5] and task.rows("eval") == ROWS[:3]
    with pytest.raises(ValueError, match=r"is one file, read as the split 'train'; it has no split 'test'"):
        get_task("dataset", path="data.parquet", rewards=[zero], eval_split="test")
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:15]),
                               "test": datasets.Dataset.from_list(ROWS[15:])})  # fmt: skip
    task = get_task("dataset", path=ds, rewards=[zero], eval_split="test")
    assert task.rows("train") == ROWS[:15] and task.rows("eval") == ROWS[15:]
    task = get_task("dataset", path=ds["train"], rewards=[zero], eval_split=ROWS[15:], eval_size=99)
    assert len(task.rows("train")) == 15 and task.rows("eval") == ROWS[15:]
    small = get_task("dataset", path=ROWS, rewards=[zero], eval_size=5)
    assert (len(small.rows("train")), len(small.rows("eval"))) == (15, 5)


class Place:
    pass


def test_tools_from_python_functions(workdir):
    write_module(workdir, "my_tools", '''
        from typing import Literal

        def weather(city: str, units: Literal["c", "f"] = "c", days: int | None = None, tags: list[str] = ()) -> str:
            """Look up the weather.

            Args:
                city: the city,
                    e.g. Paris.
                units: temperature units.
            """
            return f"{city}: sunny, 20 {units}"
    ''')  # fmt: skip
    task = get_task("dataset", path=[{"prompt": "Weather in Paris?"}], rewards=[zero], tools=["my_tools:weather"])
    tool = task.tools["weather"].definition
    assert tool.description == "Look up the weather."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "the city, e.g. Paris."},
            "units": {"enum": ["c", "f"], "type": "string", "default": "c", "description": "temperature units."},
            "days": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}, "default": []},
        },
        "required": ["city"],
    }
    text = task.prompt(task.rows("train")[0]).text()
    assert "type weather = (_: {" in text and "city: string," in text
    assert task.call_tool("weather", {"city": "Oslo"}) == "Oslo: sunny, 20 c"
    assert set(task.tool_functions) == {"weather"}

    def free(**kwargs: str) -> str:
        return ""

    def untyped(city) -> str:
        return ""

    def custom(place: Place) -> str:
        return ""

    def either(x: int | str) -> str:
        return ""

    def choose(mode: Literal["a", "b"], ok: bool, weight: float, extra: dict) -> str:
        return ""

    with pytest.raises(ValueError, match=r"tool 'free': parameter \*\*kwargs cannot be described"):
        tool_from_function(free)
    with pytest.raises(ValueError, match=r"tool 'untyped': parameter 'city' has no type hint"):
        tool_from_function(untyped)
    with pytest.raises(ValueError, match=r"tool 'custom': parameter 'place': type 'Place' cannot be described"):
        tool_from_function(custom)
    with pytest.raises(ValueError, match=r"tool 'either': parameter 'x': the union"):
        tool_from_function(either)
    assert tool_from_function(choose).definition.parameters["properties"] == {
        "mode": {"enum": ["a", "b"], "type": "string"}, "ok": {"type": "boolean"}, "weight": {"type": "number"},
        "extra": {"type": "object"},
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"tool 'my_tools:nothing'|has no function 'nothing'"):
        get_task("dataset", path=[{"prompt": "a"}], rewards=[zero], tools=["my_tools:nothing"])
