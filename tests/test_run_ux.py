"""A user's first minutes with `ossrl train` / `ossrl eval`: what a run leaves behind (samples, its starting point,
an adapter that names its base), `eval --run` reproducing the run's own number, one-line errors, a reward that
fails everywhere stopping the run, a task switch dropping the recipe's task settings, a model too big refused
before loading, a progress bar that keeps the step on a narrow terminal."""

from __future__ import annotations

import io
import json

import pytest

from ossrl.cli import main
from ossrl.config import load_config
from ossrl.recipes import TINY_CPU

RUN = [
    "steps=2", "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=6",
    "rollout.max_turns=2", "rollout.kv_cache_tokens=2048", "task.eval_limit=3", "checkpoint.every=1",
    "model.dtype=float32", "model.gradient_checkpointing=false", "logging.progress=false",
    "task.options={system_message: false}", "logging.report_to=[]",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", *RUN, f"logging.run_dir={run_dir}"]) == 0
    return run_dir


def test_a_run_leaves_samples_its_starting_point_and_an_adapter_that_names_its_base(tiny_run):
    samples = [json.loads(line) for line in (tiny_run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert all(isinstance(s["completion"], str) and s["prompt"] and "reward" in s for s in samples)
    start = json.loads((tiny_run / "starting_point.json").read_text())
    adapter_config = json.loads((tiny_run / "checkpoints" / "checkpoint-000002" / "adapter" /
                                 "adapter_config.json").read_text())  # fmt: skip
    assert adapter_config["base_model_name_or_path"] == start["base_model"] is not None


def test_eval_run_reproduces_the_runs_own_number(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(tiny_run), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    want = json.loads((tiny_run / "summary.json").read_text())["eval_after"]
    assert got["rows"] == want["rows"] == 3
    for key in ("accuracy", "reward_mean", "rewards", "finish_reasons", "sampled_tokens", "tool_use_rate"):
        assert got[key] == want[key], key
    assert len(got["samples"]) == 3 and isinstance(got["samples"][0]["completion"], str)


def test_errors_after_the_config_are_one_line(tmp_path, capsys):
    assert main(["train", *RUN, "model.path=/nonexistent/model", f"logging.run_dir={tmp_path / 'r'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("ossrl train:")]) == 1 and "Traceback" not in "\n".join(err)
    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "not an ossrl run directory" in capsys.readouterr().err


def test_a_reward_failing_on_every_sample_stops_the_run(tmp_path, capsys, monkeypatch):
    from ossrl.tasks import arithmetic
    from ossrl.tasks.rewards import Reward

    def broken(prompts, completions, **columns):
        raise KeyError("answer_column")

    original = arithmetic.Arithmetic.reward_definitions
    monkeypatch.setattr(arithmetic.Arithmetic, "reward_definitions",
                        lambda self: {**original(self), "correct": Reward("correct", broken, 1.0)})  # fmt: skip
    assert main(["train", *RUN, f"logging.run_dir={tmp_path / 'r'}"]) == 1
    err = capsys.readouterr().err
    assert "reward 'correct' failed on all 4 samples of step 1" in err and "answer_column" in err


def test_switching_the_task_drops_the_recipes_task_settings():
    config = load_config(None, ["task.name=gsm8k"], base=TINY_CPU)
    assert config.task.options == {} and config.warmup.steps == 0  # max_digits and the arithmetic warm start go
    kept = load_config(None, ["task.name=gsm8k", "task.options={path: data.jsonl}", "warmup.steps=500"], base=TINY_CPU)
    assert kept.task.options == {"path": "data.jsonl"} and kept.warmup.steps == 500
    dotted = load_config(None, ["task.name=gsm8k", "task.options.path=data.jsonl"], base=TINY_CPU)
    assert dotted.task.options == {"path": "data.jsonl"}  # the recipe's max_digits does not tag along
    same = load_config(None, ["task.name=arithmetic"], base=TINY_CPU)
    assert same.task.options == TINY_CPU["task"]["options"]


def test_a_model_too_big_for_the_device_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from ossrl.model import footprint
    from ossrl.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(footprint, "free_bytes", lambda device: 1000)
    assert main(["eval", "--model", str(path), "--task", "arithmetic", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "weights need" in err and "has 0.0 GiB free" in err


def test_the_progress_bar_keeps_step_and_eta_on_a_narrow_terminal():
    from rich.console import Console
    from rich.progress import Progress

    from ossrl.train.metrics import fit_stats, progress_columns

    stats = "reward 0.537 · acc 0.5 · rollout tok/s 1,406 · train tok/s 10,085"
    for width in (60, 80, 100, 160):
        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=True, color_system=None)
        progress = Progress(*progress_columns(), console=console, auto_refresh=False)
        task = progress.add_task("train", total=300, stats=fit_stats(stats, width, 300))
        progress.update(task, completed=110)
        console.print(progress.get_renderable())
        line = buf.getvalue().rstrip("\n")
        assert "110/300" in line and "eta" in line and len(line) <= width and "\n" not in line, (width, line)
        assert ("train tok/s 10,085" in line) == (width >= 120)
