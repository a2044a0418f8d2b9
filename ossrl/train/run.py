"""``ossrl train``: evaluate, train for ``config.steps`` GRPO steps (checkpointing, resumable), evaluate again,
write metrics, report.png and summary.json into the run directory."""

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
        eval_file = run_dir / "eval_before.json"
        if resume_from is not None:
            trainer.resume_from(resume_from)
            logger.truncate_after(trainer.step)
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
