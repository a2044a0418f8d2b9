"""The Python API, in TRL's words, for notebooks and scripts: ``ossrl.GRPOTrainer(...).train()``.

    import ossrl

    def correct(completions, answer, **kwargs):          # TRL-style: final answers as strings, columns by name
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    trainer = ossrl.GRPOTrainer(
        model="tiny",                                    # or a checkpoint directory / Hub id (openai/gpt-oss-20b)
        reward_funcs=[correct, "my_rewards:short"],      # callables or "module:function"
        train_dataset="data.jsonl",                      # a file, folder, Hub id, list of dicts or datasets.Dataset
        system="Reply with the number only.",            # options of the dataset task (ossrl.tasks.dataset)
        steps=20, rollout={"n": 4},                      # config fields (ossrl.config.TrainConfig), or "rollout.n": 4
    )
    result = trainer.train()                             # the same run_training as `ossrl train`; its summary dict

It runs exactly what ``ossrl train`` runs (``ossrl.train.run.run_training``): the dataset task is built from the
arguments (``ossrl.tasks.dataset.DatasetTask``, so what reward functions receive is documented there) and handed to
the trainer through the task registry: under the name ``dataset`` when every option can be written to YAML (paths,
``module:function`` strings), else under a name registered for this run only (callables, in-memory rows), whose
``RUN_DIR/config.json`` then records the options that are plain data. ``config`` (TRL: ``args``) is a ``TrainConfig``,
a dict of the same shape, or a YAML recipe path; without one, ``TrainConfig``'s defaults, except that ``model="tiny"``
starts from the built-in tiny CPU recipe (float32, small rollouts, LoRA lr 2e-3) without its arithmetic task and warm
start. Without ``reward_funcs`` / ``train_dataset`` it trains whatever task the config names.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ossrl.config import TrainConfig, load_config
from ossrl.tasks.base import Task, _unknown, get_task, task_options, unregister_task
from ossrl.tasks.dataset import DatasetTask, register_bound_dataset_task

log = logging.getLogger("ossrl")

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_RUN_TASKS = itertools.count(1)


class GRPOTrainer:
    """GRPO-family RL on a GPT-OSS model, from Python (see the module docstring).

    Arguments (TRL's names where they mean the same): ``model`` (model.path: "tiny", a checkpoint directory or Hub
    id), ``reward_funcs`` (a callable or ``"module:function"``, or a list of them), ``args`` / ``config``,
    ``train_dataset``, ``eval_dataset`` (a split name, a file, rows or a Dataset; None: a held-out slice of the
    training rows), ``reward_weights``, ``tools`` (Python functions the policy may call), ``overrides`` (CLI-style
    ``"section.field=value"`` strings). Other keywords are config fields (``steps=20``, ``rollout={"n": 8}``,
    ``**{"optim.lr": 1e-5}``) or options of the dataset task (``prompt_column``, ``system``, ``split``, ...).
    Everything is checked here, before any model loads: ``.config`` is the run's ``TrainConfig``, ``.task`` the task.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        reward_funcs: Callable[..., Any] | str | Sequence[Callable[..., Any] | str] | None = None,
        args: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
        reward_weights: Sequence[float] | None = None,
        tools: Sequence[Callable[..., Any] | str] | None = None,
        overrides: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        if args is not None and config is not None:
            raise ValueError("GRPOTrainer: args= and config= are the same thing; give one")
        if model is not None and not isinstance(model, str | os.PathLike):
            raise TypeError(f"GRPOTrainer: model= is a checkpoint path or Hub id (or 'tiny'), not a "
                            f"{type(model).__name__}")  # fmt: skip
        config = args if args is not None else config
        data = _config_data(config, model)
        dataset_options = set(task_options(DatasetTask.name)) - {"seed", "reasoning_effort"}
        task_opts: dict[str, Any] = {}
        for key, value in options.items():
            if "." in key or key in CONFIG_FIELDS:
                _merge(data, key, value)
            elif key == "reasoning_effort":
                _merge(data, "task.reasoning_effort", value)
            elif key in dataset_options:
                task_opts[key] = value
            else:
                known = [*CONFIG_FIELDS, *sorted(dataset_options)]
                raise ValueError(_unknown("argument", key, known, "GRPOTrainer has no") + " (config fields, or "
                                 "options of the dataset task)")  # fmt: skip
        if model is not None:
            _merge(data, "model.path", str(model))
        self.config: TrainConfig = load_config(None, list(overrides or []), base=data)
        given = {"path": train_dataset, "rewards": reward_funcs, "eval_split": eval_dataset,
                 "reward_weights": reward_weights, "tools": tools, **task_opts}  # fmt: skip
        given = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in given.items() if v is not None}
        self._bound: dict[str, Any] = {}
        if given:
            self.task: Task = self._dataset_task(given)
        else:  # the config's own task
            self.task = get_task(self.config.task.name, **self._trainer_options(self.config.task.options))
        self.result: dict[str, Any] | None = None

    def _trainer_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """What ``Trainer`` passes to ``get_task``: the config's reasoning effort and seed, then the task options."""
        cfg = self.config
        return {"reasoning_effort": cfg.task.reasoning_effort, "seed": cfg.seed, **options}

    def _dataset_task(self, given: dict[str, Any]) -> Task:
        cfg = self.config.task
        if cfg.name == DatasetTask.name:
            given = {**cfg.options, **given}
        elif cfg.options:
            log.info("GRPOTrainer: the config's task %s and its options are replaced by the dataset task", cfg.name)
        if "path" not in given:
            raise ValueError("GRPOTrainer: train_dataset= is required with reward_funcs= (a file, a folder, a Hub "
                             "dataset id, a list of dicts or a datasets.Dataset)")  # fmt: skip
        if "rewards" not in given:
            raise ValueError("GRPOTrainer: reward_funcs= is required with train_dataset= (callables or "
                             "'module:function' strings)")  # fmt: skip
        for key in ("rewards", "tools"):  # one callable or "m:f,m:g" -> a list, as TRL takes reward_funcs
            if callable(given.get(key)):
                given[key] = [given[key]]
            elif isinstance(given.get(key), str):
                given[key] = [spec.strip() for spec in given[key].split(",") if spec.strip()]
        task = DatasetTask(**self._trainer_options(given))  # every check, now: imports, data, columns
        plain = {k: v for k, v in given.items() if _is_plain(v)}
        self._bound = {k: v for k, v in given.items() if k not in plain}
        cfg.name = f"dataset-run{next(_RUN_TASKS)}" if self._bound else DatasetTask.name
        cfg.options = plain
        return task

    def train(self) -> dict[str, Any]:
        """Evaluate, train ``config.steps`` steps, evaluate again (``ossrl.train.run.run_training``). Returns its
        summary: ``eval_before`` / ``eval_after`` (accuracy, rewards, samples), ``wall_time_s``, and the paths of
        ``summary``, ``report`` and the final ``adapter``, all under ``config.logging.run_dir``."""
        from ossrl.memory.fit import check_fits
        from ossrl.train.run import run_training

        check_fits(self.config)  # before any weight is read, as `ossrl train` does (DoesNotFit: what to change)
        name = self.config.task.name
        if self._bound:
            register_bound_dataset_task(name, **self._bound)
        try:
            self.result = run_training(self.config)
        finally:
            if self._bound:
                unregister_task(name)
        return self.result


def _config_data(config: Any, model: Any) -> dict[str, Any]:
    """The config as a plain dict of sections."""
    if config is None:
        if model is not None and str(model) == "tiny":
            from ossrl.recipes import TINY_CPU

            data = copy.deepcopy(TINY_CPU)
            for section in ("task", "warmup", "logging", "checkpoint"):  # the arithmetic demo's, not yours
                data.pop(section)
            return data
        return {}
    if isinstance(config, TrainConfig):
        return config.to_dict()
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, str | os.PathLike):
        return load_config(Path(config)).to_dict()
    raise TypeError(
        f"GRPOTrainer: config/args must be a TrainConfig, a dict or a YAML path, not "
        f"{type(config).__name__} (a TRL GRPOConfig does not carry over: pass its values as keywords)"
    )


def _merge(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (a top-level field, or dotted ``section.field``); a dict (or dataclass) value for a section is
    merged into the section rather than replacing it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"GRPOTrainer: {key}: {part!r} is not a section")
    if isinstance(value, Mapping) and isinstance(node.get(last), dict) and last != "options":
        for k, v in value.items():
            _merge(node[last], k, v)
    else:
        node[last] = copy.deepcopy(value) if isinstance(value, dict | list) else value


def _is_plain(value: Any) -> bool:
    """Data a YAML config holds (so a run directory's config.json can record it): no callables, no Datasets."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return not (isinstance(value, list) and value and all(isinstance(r, dict) for r in value))  # rows in memory


__all__ = ["GRPOTrainer"]
