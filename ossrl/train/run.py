"""``ossrl train``: evaluate, train for ``config.steps`` GRPO steps (checkpointing, resumable), evaluate again,
write metrics, samples.jsonl, report.png and summary.json into the run directory.

Under torchrun every rank runs this; rank 0 alone owns the run directory (claims it, logs, writes samples,
evaluations, the report and the summary) and tells the others what it decided (the run id, the checkpoint to
resume). Checkpoints are written by every rank together (``Trainer.save``). Each rank evaluates the whole eval set
with its own engine (greedy, the same weights: the same answers), so an evaluation needs no collective."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from ossrl.config import TrainConfig
from ossrl.dist.launch import DistContext, DistributedError, launched
from ossrl.train.metrics import RunLogger, truncate_jsonl
from ossrl.train.report import write_report, write_summary
from ossrl.train.state import checkpoint_dirs, verify_checkpoint
from ossrl.train.trainer import Trainer

log = logging.getLogger(__name__)
RUN_FILE = "run.json"  # the run's id: checkpoints carry it, so a resume never picks up another run's
STARTING_POINT_FILE = "starting_point.json"  # the weights the adapters train on: what `ossrl eval --run` loads
SAMPLES_FILE = "samples.jsonl"  # a few sequences of every step, as text


def run_training(config: TrainConfig) -> dict[str, Any]:
    """One run; under torchrun (``WORLD_SIZE`` set) joins the process group first and leaves it at the end."""
    if not launched():
        return _run(config, None)
    from ossrl.dist.launch import check_same_config, destroy_distributed, init_distributed
    from ossrl.dist.mesh import mesh_shape

    dist = init_distributed(config.model.device, config.parallel.timeout_s)
    try:
        try:
            mesh_shape(config.parallel, dist.world_size)  # a mesh that cannot fit fails alike on every rank
            check_same_config(config.to_dict())
            return _run(config, dist)
        except Exception as err:
            if _collective_failure(err):
                raise DistributedError(
                    f"a collective with the other ranks failed "
                    f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}): another rank "
                    f"probably stopped (see its error), or one waited longer than parallel.timeout_s="
                    f"{config.parallel.timeout_s:g}"
                ) from err
            raise
    finally:
        destroy_distributed()


def _collective_failure(err: BaseException) -> bool:
    import torch.distributed as tdist

    if isinstance(err, tdist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection", "Timed out"))


class _NoLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's files)."""

    def log(self, step: int, metrics: Any) -> None: ...

    def log_event(self, text: str) -> None: ...

    def truncate_after(self, step: int) -> int:
        return 0

    def __enter__(self) -> _NoLogger:
        return self

    def __exit__(self, *exc: object) -> None: ...


def _from_rank0(dist: DistContext | None, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (itself in one process)."""
    if dist is None:
        return value
    import torch.distributed as tdist

    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _run(config: TrainConfig, dist: DistContext | None) -> dict[str, Any]:
    start = time.perf_counter()
    run_dir = Path(config.logging.run_dir)
    main = dist is None or dist.is_main
    trainer = Trainer(config, dist)  # first: a bad task, reward or model fails before an earlier run is touched
    notes: list[str] = []  # what happened to earlier files, for events.log once the logger is up
    run_id = resume_from = None
    if main:
        run_id = _claim_run_dir(run_dir, config.checkpoint.resume, notes)
        resume_from = _last_good_checkpoint(run_dir, run_id, notes) if config.checkpoint.resume else None
    run_id, resume_from = _from_rank0(dist, (run_id, resume_from))
    logger: Any = _NoLogger()
    if main:
        logger = RunLogger(run_dir, report_to=config.logging.report_to, config=config.to_dict(),
                           total_steps=config.steps, show_progress=config.logging.progress,
                           resume=resume_from is not None)  # fmt: skip
    with logger:
        for note in notes:
            logger.log_event(note)
        logger.log_event(f"run {run_id}; starting point: {trainer.start_info}")
        start_file = {"base_model": trainer.base_model_name, **trainer.start_info}
        if main:
            (run_dir / STARTING_POINT_FILE).write_text(json.dumps(start_file, indent=2))
        eval_file = run_dir / "eval_before.json"
        if resume_from is not None:
            trainer.resume_from(resume_from)
            logger.truncate_after(trainer.step)
            if main:
                truncate_jsonl(run_dir / SAMPLES_FILE, trainer.step)
            logger.log_event(f"resumed from {resume_from} at step {trainer.step}")
            eval_before = json.loads(eval_file.read_text()) if main and eval_file.exists() else None
        else:
            if main:
                (run_dir / SAMPLES_FILE).unlink(missing_ok=True)
            eval_before = trainer.evaluate()
            if main:
                eval_file.write_text(json.dumps(eval_before, indent=2))
            logger.log_event(f"eval before: accuracy {eval_before['accuracy']:.3f} on {eval_before['rows']} rows")
        every = config.checkpoint.every
        while trainer.step < config.steps:
            metrics = trainer.train_step()
            trainer.step += 1
            if main:
                with open(run_dir / SAMPLES_FILE, "a") as f:
                    f.writelines(json.dumps(sample) + "\n" for sample in trainer.samples)
            if metrics.get("skipped"):
                logger.log_event(f"step {trainer.step}: skipped (no usable episodes, or a non-finite loss/gradient)")
            if config.eval_every and trainer.step % config.eval_every == 0 and trainer.step < config.steps:
                metrics["eval/accuracy"] = trainer.evaluate()["accuracy"]
            logger.log(trainer.step, metrics)
            if every and trainer.step % every == 0:
                trainer.save(run_dir / "checkpoints" / f"checkpoint-{trainer.step:06d}", run_id)
        final = run_dir / "checkpoints" / f"checkpoint-{trainer.step:06d}"
        missing = main and (final not in checkpoint_dirs(run_dir) or verify_checkpoint(final, run_id) is not None)
        if _from_rank0(dist, missing):
            trainer.save(final, run_id)  # the final adapter is always written
        eval_after = trainer.evaluate()
        logger.log_event(f"eval after: accuracy {eval_after['accuracy']:.3f} on {eval_after['rows']} rows")
    wall = time.perf_counter() - start
    if not main:
        return {"summary": None, "report": None, "eval_before": eval_before, "eval_after": eval_after,
                "wall_time_s": wall, "adapter": str(final)}  # fmt: skip
    extra = {"start": trainer.start_info, "final_checkpoint": str(final)}
    summary_path = write_summary(run_dir, config=config.to_dict(), eval_before=eval_before, eval_after=eval_after,
                                 wall_time_s=wall, extra=extra)  # fmt: skip
    report = write_report(run_dir, title=f"ossrl {config.task.name}")
    return {"summary": str(summary_path), "report": str(report), "eval_before": eval_before,
            "eval_after": eval_after, "wall_time_s": wall, "adapter": str(final)}  # fmt: skip


def _claim_run_dir(run_dir: Path, resume: bool, notes: list[str]) -> str:
    """The run id of ``run_dir``: a resume continues the directory's run; a fresh run first moves an earlier run's
    files aside (``RUN_DIR.old-TIMESTAMP``, said in events.log) so it never resumes from or reports them."""
    run_file = run_dir / RUN_FILE
    if resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"checkpoint.resume=true but {run_dir} does not exist")
        if run_file.is_file():
            return json.loads(run_file.read_text())["run_id"]
        run_id = uuid.uuid4().hex[:12]  # a directory from before run ids: it becomes this run's
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            archive = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            n = 1
            while archive.exists():
                archive, n = archive.with_name(f"{archive.name.split('~')[0]}~{n}"), n + 1
            run_dir.rename(archive)
            notes.append(f"{run_dir} held an earlier run: moved it to {archive}")
            log.warning("%s held an earlier run: moved it to %s", run_dir, archive)
        run_id = uuid.uuid4().hex[:12]
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"run_id": run_id, "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return run_id


def _last_good_checkpoint(run_dir: Path, run_id: str, notes: list[str]) -> Path | None:
    """The newest checkpoint of this run whose files match their checksums; the ones skipped are said. None (and a
    fresh start in the same directory) when there is none."""
    partial = sorted((run_dir / "checkpoints").glob("*.partial"))
    skipped = [f"{p.name} (interrupted while it was written)" for p in partial]
    found = None
    for candidate in reversed(checkpoint_dirs(run_dir)):
        problem = verify_checkpoint(candidate, run_id)
        if problem is None:
            found = candidate
            break
        skipped.append(f"{candidate.name} ({problem})")
    for item in skipped:
        notes.append(f"resume: skipped checkpoint {item}")
        log.warning("resume: skipped checkpoint %s", item)
    if found is None:
        notes.append("resume: no complete checkpoint; starting from step 0")
        log.warning("resume: no complete checkpoint in %s; starting from step 0", run_dir / "checkpoints")
    return found


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
