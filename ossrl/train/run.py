"""``ossrl train``: evaluate, train for ``config.steps`` GRPO steps (checkpointing, resumable), evaluate again,
write metrics, samples.jsonl, report.png and summary.json into the run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ossrl.config import TrainConfig
from ossrl.train.metrics import RunLogger
from ossrl.train.report import write_report, write_summary
from ossrl.train.state import checkpoint_dirs
from ossrl.train.trainer import Trainer

STARTING_POINT_FILE = "starting_point.json"  # the weights the adapters train on: what `ossrl eval --run` loads
SAMPLES_FILE = "samples.jsonl"  # a few sequences of every step, as text


def run_training(config: TrainConfig) -> dict[str, Any]:
    start = time.perf_counter()
    run_dir = Path(config.logging.run_dir)
    resume_from = None
    if config.checkpoint.resume:
        found = checkpoint_dirs(run_dir)
        if not found:
            raise FileNotFoundError(f"checkpoint.resume=true but {run_dir / 'checkpoints'} has no checkpoint")
        resume_from = found[-1]
    trainer = Trainer(config)
    logger = RunLogger(run_dir, report_to=config.logging.report_to, config=config.to_dict(), total_steps=config.steps,
                       show_progress=config.logging.progress, resume=resume_from is not None)  # fmt: skip
    with logger:
        logger.log_event(f"starting point: {trainer.start_info}")
        start_file = {"base_model": trainer.base_model_name, **trainer.start_info}
        (run_dir / STARTING_POINT_FILE).write_text(json.dumps(start_file, indent=2))
        eval_file = run_dir / "eval_before.json"
        if resume_from is not None:
            trainer.resume_from(resume_from)
            logger.truncate_after(trainer.step)
            _truncate_samples(run_dir / SAMPLES_FILE, trainer.step)
            logger.log_event(f"resumed from {resume_from} at step {trainer.step}")
            eval_before = json.loads(eval_file.read_text()) if eval_file.exists() else None
        else:
            eval_before = trainer.evaluate()
            eval_file.write_text(json.dumps(eval_before, indent=2))
            logger.log_event(f"eval before: accuracy {eval_before['accuracy']:.3f} on {eval_before['rows']} rows")
        every = config.checkpoint.every
        while trainer.step < config.steps:
            metrics = trainer.train_step()
            trainer.step += 1
            with open(run_dir / SAMPLES_FILE, "a") as f:
                f.writelines(json.dumps(sample) + "\n" for sample in trainer.samples)
            if metrics.get("skipped"):
                logger.log_event(f"step {trainer.step}: skipped (no usable episodes, or a non-finite loss/gradient)")
            if config.eval_every and trainer.step % config.eval_every == 0 and trainer.step < config.steps:
                metrics["eval/accuracy"] = trainer.evaluate()["accuracy"]
            logger.log(trainer.step, metrics)
            if every and trainer.step % every == 0:
                trainer.save(run_dir / "checkpoints" / f"checkpoint-{trainer.step:06d}")
        final = run_dir / "checkpoints" / f"checkpoint-{trainer.step:06d}"
        if not (final / "trainer_state.pt").exists():
            trainer.save(final)
        eval_after = trainer.evaluate()
        logger.log_event(f"eval after: accuracy {eval_after['accuracy']:.3f} on {eval_after['rows']} rows")
    wall = time.perf_counter() - start
    extra = {"start": trainer.start_info, "final_checkpoint": str(final)}
    summary_path = write_summary(run_dir, config=config.to_dict(), eval_before=eval_before, eval_after=eval_after,
                                 wall_time_s=wall, extra=extra)  # fmt: skip
    report = write_report(run_dir, title=f"ossrl {config.task.name}")
    return {"summary": str(summary_path), "report": str(report), "eval_before": eval_before,
            "eval_after": eval_after, "wall_time_s": wall, "adapter": str(final)}  # fmt: skip


def _truncate_samples(path: Path, step: int) -> None:
    """Keep the samples of steps up to ``step`` (a resume redoes the later ones); a cut last line goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


def run_settings(run_dir: str | Path) -> dict[str, Any]:
    """What ``ossrl eval --run`` / ``ossrl chat --run`` take from a run directory: the weights the adapters were
    trained on, the last checkpoint's adapter, dtype, device, task and options, and the run's evaluation settings."""
    run_dir = Path(run_dir)
    config_file, start_file = run_dir / "config.json", run_dir / STARTING_POINT_FILE
    for path in (config_file, start_file):
        if not path.is_file():
            raise FileNotFoundError(f"--run {run_dir}: no {path.name} (not an ossrl run directory, or one written "
                                    "before it recorded its starting point)")  # fmt: skip
    config = json.loads(config_file.read_text())
    checkpoints = checkpoint_dirs(run_dir)
    adapter = checkpoints[-1] / "adapter" if checkpoints else None
    if config["lora"]["enabled"]:
        if adapter is None or not adapter.is_dir():
            raise FileNotFoundError(f"--run {run_dir}: no checkpoint with an adapter under {run_dir / 'checkpoints'}")
        model, adapter_path = json.loads(start_file.read_text())["base_model"], str(adapter)
    else:  # full fine-tuning: the checkpoint holds the whole model
        if not checkpoints:
            raise FileNotFoundError(f"--run {run_dir}: no checkpoint under {run_dir / 'checkpoints'}")
        model, adapter_path = str(checkpoints[-1] / "model"), None
    task, rollout = config["task"], config["rollout"]
    device = config["model"]["device"]
    return {
        "model": model, "adapter": adapter_path, "dtype": config["model"]["dtype"],
        "device": None if device == "auto" else device, "task": task["name"],
        "options": {"reasoning_effort": task["reasoning_effort"], "seed": config["seed"], **task["options"]},
        "limit": task["eval_limit"], "max_new_tokens": task["eval_max_new_tokens"] or rollout["max_new_tokens"],
        "max_turns": rollout["max_turns"], "split": None,
        "sampling": {"tool_timeout_s": rollout["tool_timeout_s"], "max_tool_tokens": rollout["max_tool_tokens"]},
    }  # fmt: skip
