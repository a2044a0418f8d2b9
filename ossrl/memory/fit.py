"""The fit check every run takes before loading weights (``ossrl train`` and ``ossrl.GRPOTrainer.train``): the
config's plan against the GPU it would train on, and why it cannot fit, with what to change."""

from __future__ import annotations

import logging
import os

from ossrl.config import TrainConfig

MEMORY_BUDGET_ENV = "OSSRL_GPU_GIB"  # plan against this many GiB instead of the GPU's total (0: no check)


class DoesNotFit(ValueError):
    """A config whose planned peak exceeds the GPU's memory (raised before any weight is read)."""


def memory_refusal(config: TrainConfig) -> str | None:
    """Why ``config`` cannot fit the GPU it would train on (``ossrl.memory``'s plan, what to change), or None. Runs
    when the run uses CUDA in one process, or when OSSRL_GPU_GIB gives a budget (a test, or another GPU's size)."""
    from ossrl.memory.planner import advice, budget_gib, describe, plan
    from ossrl.train.trainer import _device

    forced = os.environ.get(MEMORY_BUDGET_ENV)
    if forced is not None:
        try:
            gpu_gib = float(forced)
        except ValueError:
            return f"{MEMORY_BUDGET_ENV}={forced!r} is not a number of GiB"
        if gpu_gib <= 0:
            return None
    elif _device(config.model.device).type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        gpu_gib = budget_gib()  # (several processes shard the weights: the one-GPU plan does not apply)
    else:
        return None
    try:
        result = plan(config, gpu_gib, search=False)
    except Exception as err:  # a model the planner cannot size (or a planner bug) never stops a run: it is said
        logging.getLogger("ossrl").warning("memory check skipped: the planner failed (%s: %s)", type(err).__name__, err)
        return None
    if result.fits:
        return None
    lines = "\n  ".join(describe(result))
    return (f"this config does not fit the GPU ({gpu_gib:g} GiB); nothing was loaded. {advice(result, config)}. "
            f"ossrl memory's plan:\n  {lines}\n(check it with `ossrl memory CONFIG --gpu-gib N`; "
            f"{MEMORY_BUDGET_ENV}=0 skips this check)")  # fmt: skip


def check_fits(config: TrainConfig) -> None:
    """Raise ``DoesNotFit`` (the planner's numbers and what to change) for a config that cannot fit its GPU."""
    refusal = memory_refusal(config)
    if refusal:
        raise DoesNotFit(refusal)
