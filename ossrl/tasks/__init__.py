"""Tasks: datasets, prompts, reward functions and tools (gsm8k, retool, ifeval, matmul, arithmetic, and dataset:
your own data with TRL-style reward functions).

from ossrl.tasks import get_task, list_tasks
task = get_task("gsm8k", path="../shared/data/gsm8k/train.jsonl")
"""

from ossrl.tasks import arithmetic, dataset, gsm8k, ifeval, matmul, retool  # noqa: F401 (registers the tasks)
from ossrl.tasks.base import (
    Prompt,
    Task,
    ToolSpec,
    get_task,
    list_tasks,
    register_task,
    task_options,
    unregister_task,
)
from ossrl.tasks.data import BadRow, clean_rows, read_local
from ossrl.tasks.dataset import DatasetTask, load_function, tool_from_function
from ossrl.tasks.episode import parse_episode, render_episode
from ossrl.tasks.math_answer import answers_match, check_answer, extract_answer
from ossrl.tasks.rewards import (
    Reward,
    RewardFn,
    RewardOutput,
    RewardSet,
    as_completion,
    final_text,
    per_sample,
    tool_calls,
)

__all__ = [
    "BadRow",
    "DatasetTask",
    "Prompt",
    "Reward",
    "RewardFn",
    "RewardOutput",
    "RewardSet",
    "Task",
    "ToolSpec",
    "answers_match",
    "as_completion",
    "check_answer",
    "clean_rows",
    "extract_answer",
    "final_text",
    "get_task",
    "list_tasks",
    "load_function",
    "parse_episode",
    "per_sample",
    "read_local",
    "register_task",
    "render_episode",
    "task_options",
    "tool_calls",
    "tool_from_function",
    "unregister_task",
]
