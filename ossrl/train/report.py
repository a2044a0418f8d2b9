"""End-of-run artefacts from RUN_DIR/metrics.jsonl: report.png (the curves) and summary.json (final/best numbers)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ossrl.train.metrics import METRICS_FILE, read_metrics, write_json

REPORT_FILE = "report.png"
SUMMARY_FILE = "summary.json"
_NOT_METRICS = ("step", "time")
_SMOOTH_FROM = 30  # with more points than this, a panel draws the raw curve faintly and a smoothed one on top


@dataclass(frozen=True)
class _Panel:
    title: str
    keys: tuple[str, ...]  # plotted in this order when present
    extra: Callable[[str], bool] | None = None  # further keys (e.g. each reward function's mean)
    band: tuple[str, str] | None = None  # (mean key, std key): a +-std band around the mean


def _other_rewards(key: str) -> bool:
    return key.startswith("reward/") and key not in ("reward/mean", "reward/std")


PANELS = (
    _Panel("reward", ("reward/mean",), extra=_other_rewards, band=("reward/mean", "reward/std")),
    _Panel("accuracy", ("accuracy", "eval/accuracy")),
    _Panel("KL to reference", ("kl",)),
    _Panel("entropy", ("entropy",)),
    _Panel("clip fraction", ("clip_frac_low", "clip_frac_high")),
    _Panel("trainer vs sampler |Δ log-prob|", ("mismatch/mean_abs_diff", "mismatch/max_abs_diff")),
    _Panel("grad norm", ("grad_norm",)),
    _Panel("response length (tokens)", ("response_length",)),
    _Panel("tool calls per episode", ("tool_calls_per_episode",)),
    _Panel("throughput (tokens/s)", ("rollout_tokens_per_s", "train_tokens_per_s")),
    _Panel("peak memory (GiB)", ("peak_memory_gib",)),
    _Panel("loss", ("loss",)),
)
_LABELS = {
    "clip_frac_low": "low (A < 0)",
    "clip_frac_high": "high (A > 0)",
    "mismatch/mean_abs_diff": "mean",
    "mismatch/max_abs_diff": "max",
    "accuracy": "train",
    "eval/accuracy": "eval",
    "rollout_tokens_per_s": "rollout",
    "train_tokens_per_s": "train",
}


def _series(rows: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) sorted by step; a step logged twice keeps its last line; null -> NaN (a gap)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(row)
    out: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key in _NOT_METRICS or not (value is None or isinstance(value, int | float)):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(step)
            values.append(math.nan if value is None else float(value))
    return {k: v for k, v in out.items() if any(math.isfinite(x) for x in v[1])}


def _smooth(values: Any, width: int) -> Any:
    """Centred moving average over ``width`` points, NaN-aware, the window cut short at the ends.

    Centred rather than an EMA so the smoothed curve does not lag the raw one.
    """
    import numpy as np

    y = np.asarray(values, dtype=float)
    ok = np.isfinite(y)
    centre = float(np.mean(y[ok])) if ok.any() else 0.0  # sums of deviations: no cancellation on flat curves
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, y - centre, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(len(y))
    lo, hi = np.maximum(i - width // 2, 0), np.minimum(i + width // 2 + 1, len(y))
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (sums[hi] - sums[lo]) / n + centre
    return np.where(ok & (n > 0), out, np.nan)


def _smooth_width(n: int) -> int:
    return max(3, n // 20)


def write_report(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Plot RUN_DIR/metrics.jsonl into RUN_DIR/report.png: one small panel per curve group that was logged."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend; saving uses Agg

    run_dir = Path(run_dir)
    series = _series(read_metrics(run_dir))
    panels = []
    for panel in PANELS:
        keys = [k for k in panel.keys if k in series]
        if panel.extra is not None:
            keys += sorted(k for k in series if panel.extra(k) and k not in keys)
        if keys:
            panels.append((panel, keys))

    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.6 * ncols, 3.0 * nrows + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    last_step = max((s[0][-1] for s in series.values()), default=0)
    fig.suptitle(title or f"{run_dir.resolve().name} — {last_step} steps", fontsize=13, fontweight="bold")
    if not panels:
        axes[0].text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax in axes[len(panels) :]:
        ax.set_axis_off()

    for ax, (panel, keys) in zip(axes, panels, strict=False):
        for i, key in enumerate(keys):
            steps, values = series[key]
            x, y = np.asarray(steps), np.asarray(values)
            color = f"C{i}"
            label = _LABELS.get(key, key.removeprefix("reward/") if panel.title == "reward" else key)
            sparse = len(x) <= 20
            smooth = len(x) > _SMOOTH_FROM
            main_width = 2.0 if i == 0 else 1.2
            if panel.band is not None and key == panel.band[0] and panel.band[1] in series:
                band = dict(zip(*series[panel.band[1]], strict=True))
                std = np.asarray([band.get(s, math.nan) for s in steps])
                lo, hi = y - std, y + std
                if smooth:
                    lo, hi = _smooth(lo, _smooth_width(len(x))), _smooth(hi, _smooth_width(len(x)))
                ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0, label="±std")
            if smooth:
                ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, _smooth(y, _smooth_width(len(x))), color=color, linewidth=main_width, label=label)
            else:
                ax.plot(x, y, color=color, linewidth=main_width, marker="o" if sparse else None, markersize=3.5,
                        label=label)  # fmt: skip
        ax.set_title(panel.title, fontsize=10.5)
        ax.set_xlabel("step", fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)  # 40.1 GiB reads as 40.1, not 1e-13 + 4.01e1
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.margins(x=0.02)
        if len(keys) > 1 or panel.band is not None and panel.band[1] in series:
            ax.legend(fontsize=7.5, frameon=False)

    out = run_dir / REPORT_FILE
    fig.savefig(out)
    return out


# Direction of "best" for summary.json, by the words of a key (split on "/" and "_").
HIGHER_IS_BETTER = frozenset({"reward", "accuracy", "acc", "correct", "pass", "score"})
LOWER_IS_BETTER = frozenset({"loss", "kl"})
_NO_BEST = frozenset({"std", "var"})  # spreads are not better when larger or smaller


def best_direction(key: str) -> str | None:
    """'max', 'min' or None (no best) for a metric name.

    Rule: a key whose words (split on '/' and '_') include one of HIGHER_IS_BETTER (reward, accuracy, acc, correct,
    pass, score) is best at its max; otherwise one including LOWER_IS_BETTER (loss, kl; so also approx_kl and
    mismatch/kl_k3) is best at its min. Spreads (a word std or var) and every other key (entropy, grad norm, lengths,
    throughput, memory, clip fractions) get no best: they are diagnostics, not goals.
    """
    words = set(key.replace("/", "_").split("_"))
    if words & _NO_BEST:
        return None
    if words & HIGHER_IS_BETTER:
        return "max"
    if words & LOWER_IS_BETTER:
        return "min"
    return None


def _check_eval(name: str, value: dict | None) -> None:
    if value is not None and (not isinstance(value, dict) or "accuracy" not in value):
        raise ValueError(f"{name} must be a dict with an 'accuracy' entry (ossrl.train.evaluate gives one)")


def write_summary(
    run_dir: str | Path,
    *,
    config: dict,
    eval_before: dict | None,
    eval_after: dict | None,
    wall_time_s: float,
    extra: dict | None = None,
) -> Path:
    """Write RUN_DIR/summary.json and return its path.

    Keys: ``config``; ``steps`` (lines logged) and ``last_step``; ``final`` (each metric's last non-null value);
    ``best`` (metric -> {"value", "step", "mode"} for metrics :func:`best_direction` orders: max for reward/accuracy
    -like names, min for loss/kl-like names; the first step reaching it); ``eval_before`` / ``eval_after`` (as given,
    each with ``accuracy``) and ``eval_accuracy_gain`` (after - before, when both); ``wall_time_s``; ``extra``.
    Works without metrics.jsonl (a run stopped before its first step): final and best are then empty.
    """
    _check_eval("eval_before", eval_before)
    _check_eval("eval_after", eval_after)
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir) if (run_dir / METRICS_FILE).exists() else []
    series = _series(rows)
    both = eval_before is not None and eval_after is not None
    final: dict[str, float] = {}
    best: dict[str, dict[str, Any]] = {}
    for key, (steps, values) in sorted(series.items()):
        points = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
        final[key] = points[-1][1]
        mode = best_direction(key)
        if mode is not None:
            pick = max if mode == "max" else min
            step, value = pick(points, key=lambda p: p[1])  # max/min keep the first of equal values
            best[key] = {"value": value, "step": step, "mode": mode}
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": float(wall_time_s),
        "steps": len({r["step"] for r in rows}),
        "last_step": max((r["step"] for r in rows), default=None),
        "eval_before": eval_before,
        "eval_after": eval_after,
        "eval_accuracy_gain": eval_after["accuracy"] - eval_before["accuracy"] if both else None,  # type: ignore[index]
        "final": final,
        "best": best,
        "config": config,
        "extra": extra or {},
    }
    out = run_dir / SUMMARY_FILE
    write_json(out, summary)
    return out
