"""Accuracy of a model on a task's held-out split, generating with the rollout engine."""

from __future__ import annotations

import time
from typing import Any

from ossrl.model.gpt_oss import GptOss
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.tasks.base import Task


def accuracy_reward(task: Task, names) -> str | None:
    """The reward whose mean is the task's accuracy: ``task.accuracy_reward`` when the task computes it, else its
    first reward (a custom task's rewards need not contain one named "correct")."""
    names = list(names)
    if task.accuracy_reward in names:
        return task.accuracy_reward
    return names[0] if names else None


def evaluate(
    model: GptOss,
    tokenizer: Any,
    task: Task,
    *,
    split: str = "eval",
    limit: int | None = None,
    sampling: SamplingParams | None = None,
    engine: Engine | None = None,
    samples: int = 5,
) -> dict[str, Any]:
    """Generate one completion per row (greedy by default, the task's tools available) and score it.

    Returns ``accuracy`` (mean of the task's accuracy reward over rows where it applies), the mean total reward,
    each reward's mean, the tool-use rate, the finish reasons, timing and the first ``samples`` rows as text.
    """
    rows = task.rows(split)[:limit] if limit is not None else task.rows(split)
    if not rows:
        raise ValueError(f"task {task.name}: split {split!r} has no rows")
    sampling = sampling or SamplingParams(temperature=0.0, max_new_tokens=512, max_turns=4)
    engine = engine or Engine(model, tokenizer)
    start = time.perf_counter()
    requests = [Request(task.render_prompt(row, tokenizer)) for row in rows]
    completions = [group[0] for group in engine.generate(requests, sampling, tools=task.tool_functions or None)]
    scored = task.score(rows, completions, tokenizer=tokenizer)
    accuracy_values = [v for v in scored.values.get(accuracy_reward(task, scored.values), []) if v is not None]
    finish: dict[str, int] = {}
    for c in completions:
        finish[c.finish_reason] = finish.get(c.finish_reason, 0) + 1
    return {
        "task": task.name,
        "split": split,
        "rows": len(rows),
        "accuracy": sum(accuracy_values) / len(accuracy_values) if accuracy_values else 0.0,
        "reward_mean": sum(scored.total) / len(scored.total),
        "rewards": scored.means(),
        "tool_use_rate": sum(c.num_tool_calls > 0 for c in completions) / len(completions),
        "finish_reasons": finish,
        "sampled_tokens": sum(sum(c.loss_mask) for c in completions),
        "seconds": time.perf_counter() - start,
        "samples": [
            {"prompt": tokenizer.decode(r.prompt_ids), "completion": tokenizer.decode(c.token_ids), "reward": total,
             "finish": c.finish_reason}
            for r, c, total in list(zip(requests, completions, scored.total, strict=True))[:samples]
        ],
    }  # fmt: skip
