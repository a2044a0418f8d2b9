"""Your own task end to end on the tiny model: ``ossrl train task.name=dataset ...`` and ``ossrl.GRPOTrainer(...)
.train()`` run the same trainer; reward functions get TRL's arguments; bad names fail before any model loads."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import textwrap

import pytest

import ossrl
from ossrl.cli import main
from ossrl.tasks import list_tasks
from ossrl.train import warm_start

ROWS = [{"prompt": f"What is {i} + {i}?", "answer": 2 * i, "level": i % 3} for i in range(12)]
ANSWER = {r["prompt"]: r["answer"] for r in ROWS}
LEVEL = {r["prompt"]: r["level"] for r in ROWS}

REWARDS = """
    import json

    def correct(prompts, completions, completion_ids, answer, **kwargs):
        with open("calls.jsonl", "a") as f:
            f.write(json.dumps(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                    answer=answer, **kwargs)) + "\\n")
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    def brevity(completions, completion_ids, **kwargs):
        return [None if not c else -len(ids) / 100 for c, ids in zip(completions, completion_ids)]
"""
TOOLS = '''
    def lookup(word: str, limit: int = 3) -> str:
        """Look a word up."""
        return word.upper()
'''
FAST = [
    "steps=2", "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=6",
    "rollout.max_turns=2", "rollout.kv_cache_tokens=2048", "task.eval_limit=2", "checkpoint.every=0",
    "model.dtype=float32", "model.gradient_checkpointing=false", "logging.progress=false", "logging.report_to=[]",
    "lora.targets=[q_proj, v_proj]",
]  # fmt: skip


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "api_rewards.py").write_text(textwrap.dedent(REWARDS))
    (tmp_path / "api_tools.py").write_text(textwrap.dedent(TOOLS))
    return tmp_path


def check_calls(path, *, expected_calls):
    """What the recorded reward function received, call by call."""
    calls = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(calls) == expected_calls  # eval before, each step, eval after
    for call in calls:
        n = len(call["completions"])
        assert n >= 1 and all(isinstance(c, str) for c in call["completions"])
        assert all(p in ANSWER for p in call["prompts"]) and len(call["prompts"]) == n  # as given
        assert len(call["completion_ids"]) == n
        assert all(ids and all(isinstance(t, int) for t in ids) for ids in call["completion_ids"])
        assert call["answer"] == [ANSWER[p] for p in call["prompts"]]  # the other columns, aligned
        assert call["level"] == [LEVEL[p] for p in call["prompts"]]
        assert "prompt" not in call
    path.unlink()


def test_train_a_custom_task_from_the_cli_and_from_python(workdir, tmp_path):
    cache = f"warmup.cache_dir={tmp_path / 'cache'}"
    options = "task.options={path: data.jsonl, rewards: [api_rewards:correct, api_rewards:brevity], " \
              "reward_weights: [1, 0.1], tools: [api_tools:lookup], system: Reply with a number.}"  # fmt: skip
    rc = main(["train", "task.name=dataset", options, *FAST, cache, f"logging.run_dir={tmp_path / 'cli'}"])
    assert rc == 0
    check_calls(workdir / "calls.jsonl", expected_calls=4)
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["task"]["name"] == "dataset" and config["task"]["options"]["tools"] == ["api_tools:lookup"]
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert "correct" in json.dumps(summary)

    import api_rewards

    trainer = ossrl.GRPOTrainer(
        model="tiny",
        reward_funcs=[api_rewards.correct, "api_rewards:brevity"],
        train_dataset=ROWS,  # in memory
        eval_dataset="data.jsonl",
        system="Reply with a number.",
        overrides=[*FAST, cache, f"logging.run_dir={tmp_path / 'py'}"],
    )
    name = trainer.config.task.name
    assert name.startswith("dataset-run") and name not in list_tasks()  # registered for the run only
    assert trainer.config.task.options == {"eval_split": "data.jsonl", "system": "Reply with a number."}
    result = trainer.train()
    assert name not in list_tasks()
    assert set(result) >= {"eval_before", "eval_after", "summary", "adapter", "wall_time_s"}
    assert result["eval_after"]["task"] == name and set(result["eval_after"]["rewards"]) == {"correct", "brevity"}
    check_calls(workdir / "calls.jsonl", expected_calls=4)
    metrics = [json.loads(line) for line in (tmp_path / "py" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all("accuracy" in m for m in metrics)  # accuracy: the first reward, correct


def test_bad_reward_names_fail_before_any_model_loads(workdir, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(warm_start, "load_starting_point", no_model)
    from ossrl.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "load_starting_point", no_model)
    rc = main(["train", "task.name=dataset", "task.options={path: data.jsonl, rewards: [api_rewards:corect]}",
               *FAST, f"logging.run_dir={workdir / 'run'}"])  # fmt: skip
    assert rc == 1
    assert "has no function 'corect'; available: brevity, correct (did you mean 'correct'?)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"no module 'missing_rewards': looked in the working directory"):
        ossrl.GRPOTrainer("tiny", ["missing_rewards:correct"], train_dataset="data.jsonl")
    with pytest.raises(ValueError, match=r"data.jsonl:2: not valid JSON"):
        (workdir / "data.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
        ossrl.GRPOTrainer("tiny", ["api_rewards:correct"], train_dataset="data.jsonl")


def test_arguments_go_to_the_config_or_the_task(workdir, tmp_path):
    def correct(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = ossrl.GRPOTrainer(
        "tiny", correct, train_dataset="data.jsonl", prompt_column="prompt", eval_size=3, steps=7,
        rollout={"n": 3}, **{"optim.lr": 1e-3}, reasoning_effort="medium",
    )  # fmt: skip
    cfg = trainer.config
    assert (cfg.steps, cfg.rollout.n, cfg.optim.lr, cfg.task.reasoning_effort) == (7, 3, 1e-3, "medium")
    assert cfg.rollout.max_new_tokens == 48 and cfg.model.dtype == "float32"  # model="tiny": the tiny CPU recipe's
    assert cfg.warmup.steps == 0 and cfg.model.path == "tiny"
    assert (len(trainer.task.rows("train")), len(trainer.task.rows("eval"))) == (9, 3)
    assert trainer.task.prompt(trainer.task.rows("train")[0]).reasoning_effort == "medium"
    with pytest.raises(ValueError, match=r"GRPOTrainer has no argument 'stepz'.*did you mean 'steps'"):
        ossrl.GRPOTrainer("tiny", correct, train_dataset="data.jsonl", stepz=3)
    with pytest.raises(ValueError, match="train_dataset= is required"):
        ossrl.GRPOTrainer("tiny", correct)
    # Plain options (paths, module:function) go through the config as `ossrl train` would take them.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: 5\nmodel: {path: tiny, dtype: float32}\ntask: {name: dataset, options: "
                      "{path: data.jsonl, rewards: [api_rewards:correct], eval_size: 2}}\n")  # fmt: skip
    from_yaml = ossrl.GRPOTrainer(args=str(recipe), steps=6)
    assert from_yaml.config.task.name == "dataset" and from_yaml.config.steps == 6
    assert len(from_yaml.task.rows("eval")) == 2
    plain = ossrl.GRPOTrainer(config=recipe, reward_funcs="api_rewards:brevity", system="Hi.")
    assert plain.config.task.name == "dataset"
    assert plain.config.task.options == {"path": "data.jsonl", "rewards": ["api_rewards:brevity"], "eval_size": 2,
                                         "system": "Hi."}  # fmt: skip


def test_import_ossrl_stays_light():
    code = "import sys, ossrl; assert 'torch' not in sys.modules; assert ossrl.GRPOTrainer.__name__ == 'GRPOTrainer'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_custom_task_example_builds(monkeypatch):
    """examples/custom_task: its config and its Python script build the same task (no training here; the example
    itself trains in ~15 s: cd examples/custom_task && ossrl train train.yaml)."""
    from pathlib import Path

    from ossrl.config import load_config
    from ossrl.tasks import get_task

    folder = Path(__file__).resolve().parents[1] / "examples" / "custom_task"
    monkeypatch.chdir(folder)
    config = load_config("train.yaml")
    task = get_task(config.task.name, seed=config.seed, **config.task.options)
    assert [r.name for r in task.rewards] == ["correct", "is_number"] and len(task.rows("eval")) == 4
    out = task.score(task.rows("eval")[:1] * 2, [str(task.rows("eval")[0]["answer"]), "twelve"])
    assert out.values == {"correct": [1.0, 0.0], "is_number": [1.0, 0.0]}
    monkeypatch.syspath_prepend(str(folder))
    built = []
    result = {"eval_before": {"accuracy": 0.0}, "eval_after": {"accuracy": 0.0}, "report": "report.png"}
    monkeypatch.setattr(ossrl.GRPOTrainer, "train", lambda self: built.append(self) or result)
    runpy.run_path(str(folder / "train.py"), run_name="__main__")
    (trainer,) = built
    assert trainer.config.steps == 10 and trainer.config.model.path == "tiny"
    assert [r.name for r in trainer.task.rewards] == ["correct", "is_number"] and len(trainer.task.rows("eval")) == 4
