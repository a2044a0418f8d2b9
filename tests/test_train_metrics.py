"""RunLogger (metrics.jsonl, TensorBoard, W&B, progress output, resume) and the end-of-run report and summary."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from ossrl.train.metrics import RunLogger, read_metrics
from ossrl.train.report import best_direction, write_report, write_summary


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_log_appends_flushed_json_lines(tmp_path):
    run = tmp_path / "run"
    logger = RunLogger(run, report_to=(), config={"lr": 1e-5, "path": tmp_path}, show_progress=False)
    assert json.loads((run / "config.json").read_text()) == {"lr": 1e-5, "path": str(tmp_path)}
    logger.log(
        1, {"reward/mean": 0.5, "kl": torch.tensor(0.25), "n": 3, "flag": True, "nan": float("nan"), "inf": -math.inf}
    )
    logger.log(2, {"reward/mean": None})
    # Read before close: each line is already flushed, as a killed run would leave it.
    first, second = _lines(run)
    assert first["step"] == 1 and isinstance(first["time"], float)
    assert {k: first[k] for k in ("reward/mean", "kl", "n", "flag", "nan", "inf")} == {
        "reward/mean": 0.5,
        "kl": 0.25,
        "n": 3.0,
        "flag": 1.0,
        "nan": None,
        "inf": None,
    }
    assert second == {"step": 2, "time": second["time"], "reward/mean": None}
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(3, {})


def test_bad_metric_values_are_rejected(tmp_path):
    with RunLogger(tmp_path, report_to=(), show_progress=False) as logger:
        with pytest.raises(TypeError, match="'phase'"):
            logger.log(1, {"phase": "warmup"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 3})


def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, config={}, show_progress=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"reward/mean": step / 10, "kl": float("nan") if step == 2 else 0.1})
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("reward/mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [e.step for e in acc.Scalars("kl")] == [1, 3]  # the NaN is skipped


def test_resume_truncates_to_the_checkpoint_step(tmp_path):
    with RunLogger(tmp_path, report_to=(), show_progress=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward/mean": float(step)})
        logger.log_event("checkpoint at step 3")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')  # the kill landed mid-line
    with RunLogger(tmp_path, report_to=(), show_progress=False, resume=True) as logger:
        assert logger.truncate_after(3) == 3  # steps 4, 5 and the cut line
        assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3]
        for step in range(4, 7):
            logger.log(step, {"reward/mean": float(step)})
        logger.log_event("resumed at step 3")
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert len((tmp_path / "events.log").read_text().splitlines()) == 2  # events survive a resume
    # A fresh (non-resumed) run in the same directory starts the files over.
    with RunLogger(tmp_path, report_to=(), show_progress=False) as logger:
        logger.log(1, {"reward/mean": 9.0})
    assert [r["step"] for r in _lines(tmp_path)] == [1]
    assert (tmp_path / "events.log").read_text() == ""


def test_resume_purges_tensorboard_points_after_the_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, show_progress=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with RunLogger(tmp_path, show_progress=False, resume=True) as logger:
        logger.truncate_after(3)
        for step in (4, 5):
            logger.log(step, {"loss": 10.0 * step})
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_report_to_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, installed or not
    with pytest.raises(ValueError, match=r"report_to=wandb needs `pip install wandb`"):
        RunLogger(tmp_path / "run", report_to=("tensorboard", "wandb"), show_progress=False)
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_report_to_wandb_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with RunLogger(tmp_path, report_to="wandb", config={"lr": 1.0}, show_progress=False) as logger:
        logger.log(1, {"reward/mean": 0.5, "kl": None})
    with RunLogger(tmp_path, report_to=["wandb"], config={"lr": 1.0}, show_progress=False, resume=True):
        pass
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["dir"] == str(tmp_path) and inits[0]["config"] == {"lr": 1.0}
    assert inits[1]["id"] == inits[0]["id"] and inits[1]["resume"] == "allow"
    assert ("log", {"reward/mean": 0.5}, 1) in calls and calls.count(("finish",)) == 2
    assert not (tmp_path / "tensorboard").exists()


def test_unknown_report_to_lists_the_allowed_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown \['mlflow'\].*'tensorboard', 'wandb'"):
        RunLogger(tmp_path, report_to=("tensorboard", "mlflow"), show_progress=False)
    with RunLogger(tmp_path, report_to="none", show_progress=False) as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_progress_prints_plain_lines_and_events_off_a_terminal(tmp_path, capsys):
    with RunLogger(tmp_path, report_to=(), total_steps=2, show_progress=True) as logger:
        logger.log(1, {"reward/mean": 0.25, "accuracy": 0.5, "kl": 0.001, "tokens_per_s": 1234.0, "loss": 1.0})
        logger.log_event("skipped step 2: non-finite loss")
        logger.log(2, {"rollout_tokens_per_s": 10.0})
    err = capsys.readouterr().err
    assert "step 1/2 · reward 0.25 · acc 0.5 · kl 1.00e-03 · tok/s 1,234" in err
    assert "step 2/2 · rollout tok/s 10" in err
    assert "skipped step 2: non-finite loss" in err
    assert (tmp_path / "events.log").read_text().rstrip().endswith("skipped step 2: non-finite loss")


def _synthetic_run(run_dir: Path, steps: int = 60) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(1, steps + 1):
        row = {
            "step": s,
            "time": 1000.0 + s,
            "reward/mean": s / steps,
            "reward/std": 0.1,
            "reward/correct": s / steps * 0.9,
            "accuracy": s / steps * 0.8,
            "kl": 0.001 * s,
            "entropy": 1.0 - s / (2 * steps),
            "clip_frac_low": 0.01,
            "clip_frac_high": 0.02,
            "mismatch/mean_abs_diff": 0.01,
            "mismatch/max_abs_diff": 0.2,
            "grad_norm": 1.0 + (s % 7) / 10,
            "response_length": 100 + s,
            "tool_calls_per_episode": 0.5,
            "rollout_tokens_per_s": 900.0,
            "train_tokens_per_s": 2000.0,
            "peak_memory_gib": 1.5,
            "loss": 1.0 / s if s != 30 else None,
        }
        if s % 20 == 0:
            row["eval/accuracy"] = s / steps * 0.7
        rows.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 61, "rew')  # cut last line


def test_report_png_from_synthetic_metrics(tmp_path):
    import matplotlib.image

    _synthetic_run(tmp_path)
    out = write_report(tmp_path, title="synthetic")
    assert out == tmp_path / "report.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 600 and image.shape[1] > 900 and image.std() > 0.01  # a grid, not a blank canvas


def test_report_with_few_keys_or_none(tmp_path):
    import matplotlib.image

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    assert matplotlib.image.imread(write_report(tmp_path / "a")).shape[0] > 100
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    assert write_report(tmp_path / "b").exists()


def test_summary_final_best_and_evals(tmp_path):
    _synthetic_run(tmp_path)
    config = {"optim": {"lr": 5e-5}, "seed": 0}
    extra = {"adapter": tmp_path / "ckpt"}
    out = write_summary(
        tmp_path,
        config=config,
        eval_before={"accuracy": 0.25, "rows": 40},
        eval_after={"accuracy": 0.75, "rows": 40},
        wall_time_s=12.5,
        extra=extra,
    )
    summary = json.loads(out.read_text())
    assert out == tmp_path / "summary.json"
    assert summary["config"] == config and summary["wall_time_s"] == 12.5
    assert summary["extra"] == {"adapter": str(tmp_path / "ckpt")}
    assert summary["eval_before"]["accuracy"] == 0.25 and summary["eval_after"]["accuracy"] == 0.75
    assert summary["eval_accuracy_gain"] == pytest.approx(0.5)
    assert summary["steps"] == 60 and summary["last_step"] == 60
    final, best = summary["final"], summary["best"]
    assert final["reward/mean"] == 1.0 and final["loss"] == pytest.approx(1 / 60)
    assert final["eval/accuracy"] == pytest.approx(0.7)  # last value logged, even if not on the last step
    assert best["reward/mean"] == {"value": 1.0, "step": 60, "mode": "max"}
    assert best["eval/accuracy"]["step"] == 60 and best["accuracy"]["mode"] == "max"
    assert best["loss"] == {"value": pytest.approx(1 / 60), "step": 60, "mode": "min"}
    assert best["kl"] == {"value": 0.001, "step": 1, "mode": "min"}
    assert not {"reward/std", "entropy", "grad_norm", "response_length", "peak_memory_gib"} & best.keys()
    assert "step" not in final and "time" not in final


def test_summary_needs_eval_accuracy_and_tolerates_no_metrics(tmp_path):
    with pytest.raises(ValueError, match="eval_after.*accuracy"):
        write_summary(tmp_path, config={}, eval_before=None, eval_after={"rows": 3}, wall_time_s=1.0)
    summary = json.loads(
        write_summary(tmp_path, config={}, eval_before=None, eval_after={"accuracy": 0.5}, wall_time_s=1.0).read_text()
    )
    assert summary["final"] == {} and summary["best"] == {} and summary["eval_accuracy_gain"] is None


@pytest.mark.parametrize(
    ("key", "mode"),
    [
        ("reward/mean", "max"),
        ("reward/correct", "max"),
        ("eval/accuracy", "max"),
        ("loss", "min"),
        ("policy_loss", "min"),
        ("kl", "min"),
        ("mismatch/kl_k3", "min"),
        ("reward/std", None),
        ("entropy", None),
        ("grad_norm", None),
        ("clip_frac_high", None),
    ],
)
def test_best_direction(key, mode):
    assert best_direction(key) == mode


def test_read_metrics_skips_cut_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\nnot json\n{"a": 2}\n{"step": 2, "a": nu')
    assert read_metrics(tmp_path) == [{"step": 1, "a": 1}]
