"""Per-step run logging: metrics.jsonl (the source of truth), TensorBoard, optional W&B, a rich progress bar.

Layout of a run directory::

    RUN_DIR/config.json      the run's config, written at start
    RUN_DIR/metrics.jsonl    one line per logged step: {"step": int, "time": unix seconds, key: float | null, ...}
    RUN_DIR/events.log       one-off lines (skipped steps, checkpoints, resumes), timestamped
    RUN_DIR/tensorboard/     TensorBoard event files (``report_to`` includes "tensorboard")
    RUN_DIR/wandb/           Weights & Biases files (``report_to`` includes "wandb")
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

REPORT_TO = ("tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.log"
CONFIG_FILE = "config.json"
TB_DIR = "tensorboard"
_WANDB_ID_FILE = "wandb_run_id"
_RESERVED = ("step", "time")
# What the progress bar shows, in order, when the step logged it.
_BAR_KEYS = (("reward/mean", "reward"), ("accuracy", "acc"), ("kl", "kl"), ("tokens_per_s", "tok/s"))
# Shown only when the step has no plain tokens_per_s.
_BAR_TPS_FALLBACK = (("rollout_tokens_per_s", "rollout tok/s"), ("train_tokens_per_s", "train tok/s"))


def to_float(key: str, value: Any) -> float | None:
    """A metric value as a finite float, or None (None, NaN, inf). Accepts bools, 0-d tensors and numpy scalars."""
    if value is None:
        return None
    if hasattr(value, "item"):  # torch / numpy scalars; .item() on a CUDA tensor syncs, as any logging must
        value = value.item()
    if not isinstance(value, int | float):  # bool is an int: a flag logs as 0/1
        raise TypeError(f"metric {key!r}: expected a number or None, got {type(value).__name__}")
    value = float(value)
    return value if math.isfinite(value) else None


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON accepts: non-finite floats -> null, tensors -> numbers, the rest -> str."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return json_safe(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON atomically (a killed run never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of ``RUN_DIR/metrics.jsonl`` in file order; unparseable lines (a run killed mid-write) are skipped."""
    rows = []
    with open(Path(run_dir) / METRICS_FILE, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def truncate_jsonl(path: Path, step: int) -> int:
    """Keep the lines of a per-step JSONL file (metrics, samples) with ``step <= step``; a line cut short by a kill
    goes too. Rewritten atomically; returns how many lines were dropped (0 when there is no file)."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                ok = json.loads(line)["step"] <= step
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if ok:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


def progress_columns() -> list[Any]:
    """The live bar's columns: a 10-cell bar, the step, elapsed time and ETA, then the stats, which ``fit_stats``
    cuts to the terminal's width so that a narrow terminal loses stats, never the step or the ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Column

    def fixed() -> Column:
        return Column(no_wrap=True)

    return [
        TextColumn("[bold]train", table_column=fixed()),
        BarColumn(bar_width=10, table_column=fixed()),
        MofNCompleteColumn(table_column=fixed()),
        TimeElapsedColumn(table_column=fixed()),
        TextColumn("eta", table_column=fixed()),
        TimeRemainingColumn(table_column=fixed()),
        TextColumn("{task.fields[stats]}", table_column=fixed()),
    ]


def fit_stats(stats: str, width: int, total: int | None) -> str:
    """``stats`` cut (with an ellipsis) to what a ``width``-column terminal leaves beside the fixed columns."""
    digits = len(str(total or 0))
    room = width - (48 + 2 * digits)  # "train " + bar + " N/N " + "0:00:00 eta -:--:-- " and separators
    if len(stats) <= room:
        return stats
    return stats[: max(0, room - 1)] + "…" if room > 1 else ""


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ValueError("report_to=wandb needs `pip install wandb`") from e
    return wandb


def _fmt(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if x == 0 or abs(x) >= 0.01:
        return f"{x:.3g}"
    return f"{x:.2e}"


class RunLogger:
    """Logs one training run's per-step metrics and events to RUN_DIR, TensorBoard, W&B and a progress bar.

    ``step`` is the optimizer step just finished, counted from 1, so the bar reads step/total.
    ``resume=True`` appends to the existing files; call :meth:`truncate_after` with the checkpoint's step before
    logging, so steps the killed run logged after its last checkpoint are dropped (from TensorBoard as well) rather
    than duplicated. W&B continues the same run (its id is kept in RUN_DIR); it ignores steps it has already seen.
    Without ``resume`` an existing metrics.jsonl / events.log is overwritten and old TensorBoard curves are purged.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        report_to: Sequence[str] = ("tensorboard",),
        config: dict | None = None,
        total_steps: int | None = None,
        show_progress: bool = True,
        resume: bool = False,
    ) -> None:
        report = (report_to,) if isinstance(report_to, str) else tuple(report_to)
        report = tuple(r for r in report if r != "none")  # HF's spelling of "nothing"
        unknown = [r for r in report if r not in REPORT_TO]
        if unknown:
            raise ValueError(f"report_to: unknown {unknown}; allowed: {list(REPORT_TO)}, 'none' or empty")
        wandb = _import_wandb() if "wandb" in report else None  # fail before anything is written
        self.run_dir = Path(run_dir)
        self.report_to = report
        self.config = dict(config or {})
        self.total_steps = total_steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb: Any = self._init_wandb(wandb, resume) if wandb is not None else None
        write_json(self.run_dir / CONFIG_FILE, self.config)
        mode = "a" if resume else "w"
        self._metrics: IO[str] = open(self.run_dir / METRICS_FILE, mode, encoding="utf-8")
        self._events: IO[str] = open(self.run_dir / EVENTS_FILE, mode, encoding="utf-8")
        self._tb: Any = None
        # A fresh run purges whatever an earlier run left in tensorboard/ (SessionLog START at step 0).
        self._tb_purge_step: int | None = None if resume else 0
        self._closed = False
        self._init_console(show_progress)

    # -- backends -------------------------------------------------------------------------------------------------

    def _init_wandb(self, wandb: Any, resume: bool) -> Any:
        # Project, entity and name come from WANDB_PROJECT / WANDB_ENTITY / WANDB_NAME as usual.
        id_file = self.run_dir / _WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        return wandb.init(dir=str(self.run_dir), config=self.config, id=run_id, resume="allow")

    def _tb_writer(self) -> Any:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: slow, so only when used

            # flush_secs: a killed run loses at most ~10 s of TensorBoard points (metrics.jsonl loses none).
            self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=self._tb_purge_step, flush_secs=10)
            self._tb_purge_step = None
        return self._tb

    def _init_console(self, show_progress: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        # A live bar needs a terminal; elsewhere (CI, a log file) each step prints one plain line instead.
        self._live = show_progress and self.console.is_terminal and not self.console.is_dumb_terminal
        self._plain_lines = show_progress and not self._live
        self._progress: Any = None
        if self._live:
            from rich.progress import Progress

            self._progress = Progress(*progress_columns(), console=self.console)
            self._task = self._progress.add_task("train", total=self.total_steps, stats="")
            self._progress.start()

    # -- logging --------------------------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step: a flushed metrics.jsonl line, TensorBoard/W&B scalars, the progress bar.

        Values are numbers, 0-d tensors, numpy scalars or None; None and non-finite values are written as null
        and not sent to TensorBoard/W&B.
        """
        self._check_open()
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved (every line has 'step' and 'time')")
        values = {k: to_float(k, v) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), "time": round(time.time(), 3), **values}, allow_nan=False)
        self._metrics.write(line + "\n")
        self._metrics.flush()  # in the OS's hands now: a killed process keeps every line
        scalars = {k: v for k, v in values.items() if v is not None}
        if "tensorboard" in self.report_to:
            tb = self._tb_writer()
            for k, v in scalars.items():
                tb.add_scalar(k, v, global_step=step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        self._show(step, scalars)

    def _show(self, step: int, scalars: dict[str, float]) -> None:
        keys = _BAR_KEYS if "tokens_per_s" in scalars else _BAR_KEYS[:-1] + _BAR_TPS_FALLBACK
        stats = " · ".join(f"{label} {_fmt(scalars[k])}" for k, label in keys if k in scalars)
        if self._progress is not None:
            stats = fit_stats(stats, self.console.width, self.total_steps)
            self._progress.update(self._task, completed=step, stats=stats)
        elif self._plain_lines:
            total = self.total_steps
            # About 50 lines for a whole run: enough to follow it in a log file without drowning it.
            stride = max(1, round(total / 50)) if total else 1
            if step <= 1 or step % stride == 0 or step == total:
                head = f"step {step}/{total}" if total else f"step {step}"
                self.console.print(head + (f" · {stats}" if stats else ""), highlight=False, soft_wrap=True)

    def log_event(self, text: str) -> None:
        """A one-off line (a skipped step, a checkpoint): printed above the bar and appended to events.log."""
        self._check_open()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._events.write(f"{stamp} {text}\n")
        self._events.flush()
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def truncate_after(self, step: int) -> int:
        """Keep the metrics.jsonl lines with ``step <= step`` (and drop TensorBoard points after it).

        For resuming from a checkpoint taken at ``step``: what the killed run logged later is logged again.
        Returns how many lines were dropped.
        """
        self._check_open()
        path = self.run_dir / METRICS_FILE
        self._metrics.close()
        dropped = truncate_jsonl(path, step)
        self._metrics = open(path, "a", encoding="utf-8")
        # TensorBoard discards earlier points with global_step >= purge_step when it sees the new writer's start.
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._tb_purge_step = step + 1
        return dropped

    # -- lifetime -------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunLogger for {self.run_dir} is closed")

    def close(self) -> None:
        """Stop the bar and flush and close every writer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        self._metrics.close()
        self._events.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
