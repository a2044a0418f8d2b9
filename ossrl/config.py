"""Typed run configuration: dataclasses, YAML recipes, dotted command-line overrides, clear errors.

    cfg = load_config("configs/gsm8k_20b.yaml", ["optim.lr=1e-5", "rollout.n=8"])

Every field has the recommended default. A bad key or value fails with one message naming the field and what is
allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ossrl.model.lora import ALL_TARGETS as LORA_TARGETS

log = logging.getLogger(__name__)


@dataclass
class ModelSettings:
    path: str = "tiny"  # an HF checkpoint directory / Hub id, or "tiny" (built here, for the CPU demo)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "auto"  # auto: cuda if available, else cpu
    gradient_checkpointing: bool = True
    # Memory options (README "Memory options"; ossrl.model.offload.apply_memory_options):
    offload_activations: bool = False  # checkpointed layers' inputs wait in pinned host memory for the backward
    offload_embeddings: bool = False  # the (frozen: LoRA runs) embedding table stays on the CPU; rows gathered there
    moe_chunk_tokens: int | None = None  # MoE layers run this many tokens at a time (None: all at once)


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class RolloutSettings:
    prompts_per_step: int = 8
    n: int = 4  # samples per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 512
    max_turns: int = 4
    tool_timeout_s: float = 30.0
    max_tool_tokens: int = 512
    max_num_seqs: int = 256
    kv_cache_tokens: int | None = None
    cuda_graphs: bool = False  # decode steps replayed from CUDA graphs (ossrl.rollout.graphs); opt-in for now
    torch_compile: bool = False  # the decode step through torch.compile, one compile per batch bucket; opt-in


@dataclass
class AlgorithmSettings:
    """What each option does, with its default, is the README's "RL algorithms" table."""

    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    scale: Literal["group", "batch", "none"] | None = None  # None: the estimator's own (grpo group, others none)
    loss: Literal["ppo", "gspo", "cispo", "pg"] = "ppo"
    eps_low: float | None = None  # None: the loss's own (ppo 0.2, gspo 3e-4, cispo no lower bound)
    eps_high: float | None = None  # None: the loss's own (ppo 0.28, gspo 4e-4, cispo 4.0)
    dual_clip: float | None = None  # ppo only: dual-clip constant c > 1 for negative advantages (None: off)
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = 0.0
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    updates_per_batch: int = 1  # 1 = strict on-policy: old log-probs are the current ones, detached (ratio 1)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, draw more prompts
    max_refills: int = 2
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens before max_new_tokens (0: off)
    overlong_penalty: float = 1.0
    tis_cap: float | None = 2.0  # token-level truncated importance sampling (sampler vs trainer); None: off
    seq_mask_hi: float | None = None  # sequence-level masked IS: drop sequences with geometric ratio outside
    router_replay: bool = False  # R3: the training forward uses the experts the engine chose for each token (gates
    # recomputed from the current router logits of those experts); router/route_mismatch_frac says how often they differ


@dataclass
class OptimSettings:
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 8192


@dataclass
class TaskSettings:
    name: str = "arithmetic"
    options: dict[str, Any] = field(default_factory=dict)
    reasoning_effort: Literal["low", "medium", "high"] = "low"
    eval_limit: int | None = 200
    eval_max_new_tokens: int | None = None  # default: rollout.max_new_tokens


@dataclass
class WarmupSettings:
    """Supervised warm start on the task's demonstrations (tasks that provide them, e.g. arithmetic)."""

    steps: int = 0
    examples: int = 2000
    tool_fraction: float = 0.5
    # The first tool_first_steps of the steps see only tool-using demonstrations (the tool's call format, and copying
    # numbers into it and out of its result); the rest mix in direct answers at tool_fraction.
    tool_first_steps: int = 0
    lr: float = 3e-3
    batch_size: int = 32
    cache_dir: str = "~/.cache/ossrl/warm_start"


@dataclass
class LoggingSettings:
    run_dir: str = "runs/latest"
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True


@dataclass
class CheckpointSettings:
    every: int = 50
    resume: bool = False


@dataclass
class ParallelSettings:
    """Multi-process runs (``torchrun ... -m ossrl train``); a one-process run ignores this section. The world's
    processes form a mesh dp_replicate x dp_shard x sp: FSDP2 shards the trainable weights over dp_shard (HSDP:
    replicated over dp_replicate), every dp rank samples its share of the step's prompts, and the sp ranks of one dp
    rank split each sequence (Ulysses). -1: all the ranks the other two leave."""

    dp_replicate: int = 1
    dp_shard: int = -1
    sp: int = 1
    timeout_s: float = 300.0  # a collective waiting longer (a dead or stuck rank) fails the run on every rank


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    eval_every: int = 0  # 0: evaluate before and after only
    deterministic: bool = False  # batch-invariant kernels (ossrl.deterministic()): sampler == trainer log-probs
    # Run model-written code even where the sandbox cannot isolate it (no root / user namespaces / cgroup); it then
    # runs with what protections there are and says which are missing. Off: such a run refuses to start.
    allow_unisolated_sandbox: bool = False
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    algorithm: AlgorithmSettings = field(default_factory=AlgorithmSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    task: TaskSettings = field(default_factory=TaskSettings)
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently convert: int -> float, "1e-5" -> float) a value against a field's type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config field {name!r}{hint} (fields here: {', '.join(known)})")
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> TrainConfig:
    """A TrainConfig from a YAML recipe, or a ``base`` dict of the same shape (both optional), plus
    ``section.field=value`` overrides (YAML values)."""
    data: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    recipe_task = (data.get("task") or {}).get("name") if isinstance(data.get("task"), dict) else None
    keys = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err
        _set_dotted(data, key.strip(), value)
        keys.append(key.strip())
    _forget_other_tasks_settings(data, recipe_task, keys)
    config = _build(TrainConfig, data, "")
    validate(config)
    return config


def _forget_other_tasks_settings(data: dict[str, Any], recipe_task: str | None, keys: list[str]) -> None:
    """An override that switches the recipe to another task drops what belonged to the recipe's task: its task
    options (``max_digits`` means nothing to gsm8k) and its warm start (demonstrations of that task), unless the
    overrides set them too."""
    task = data.get("task") if isinstance(data.get("task"), dict) else None
    if task is None or recipe_task is None or "task.name" not in keys or task.get("name") == recipe_task:
        return
    dropped = []
    if "options" in task and "task.options" not in keys:  # task.options=... already replaced them whole
        given = {k.removeprefix("task.options.").split(".")[0] for k in keys if k.startswith("task.options.")}
        options = task.pop("options") or {}
        if given and isinstance(options, dict):
            task["options"] = {k: v for k, v in options.items() if k in given}
        dropped.append("task.options")
    if "warmup" in data and not any(k.startswith("warmup") for k in keys):
        data.pop("warmup")
        dropped.append("warmup")
    if dropped:
        log.info("task.name: %s instead of the recipe's %s; the recipe's %s dropped", task.get("name"), recipe_task,
                 " and ".join(dropped))  # fmt: skip


def validate(config: TrainConfig) -> None:
    """Every impossible value or combination, all at once (one ConfigError naming each field), before anything
    loads."""
    problems: list[str] = []

    def check(ok: bool, name: str, why: str) -> None:
        if not ok:
            problems.append(f"{name}: {why}")

    def finite(value: float) -> bool:
        return math.isfinite(value)

    r, algo, opt, lora, warm = config.rollout, config.algorithm, config.optim, config.lora, config.warmup
    check(config.steps >= 0, "steps", "must be >= 0")
    check(config.eval_every >= 0, "eval_every", "must be >= 0")
    # rollout
    check(r.n >= 1, "rollout.n", "must be >= 1 (use >= 2 for group baselines)")
    check(r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
    check(finite(r.temperature) and r.temperature > 0, "rollout.temperature",
          "must be a finite number > 0 for RL (log-probs at temperature T)")  # fmt: skip
    check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    check(r.top_k >= 0, "rollout.top_k", "must be >= 0 (0: off)")
    check(0 <= r.min_p < 1, "rollout.min_p", "must be in [0, 1)")
    check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    check(r.max_turns >= 1, "rollout.max_turns", "must be >= 1")
    check(r.tool_timeout_s > 0, "rollout.tool_timeout_s", "must be > 0")
    check(r.max_tool_tokens >= 1, "rollout.max_tool_tokens", "must be >= 1")
    check(r.max_num_seqs >= 1, "rollout.max_num_seqs", "must be >= 1")
    check(r.n <= r.max_num_seqs, "rollout.n", f"must be <= rollout.max_num_seqs={r.max_num_seqs} (a prompt's samples "
          "decode together)")  # fmt: skip
    check(r.kv_cache_tokens is None or r.kv_cache_tokens >= 1, "rollout.kv_cache_tokens", "must be >= 1 (or null)")
    # algorithm
    check(r.n >= 2, "rollout.n", f"must be >= 2: {algo.advantage} advantages compare samples of one prompt "
          "(a group of one gets advantage 0 and trains nothing)")  # fmt: skip
    check(not (algo.advantage == "dr_grpo" and algo.scale not in (None, "none")), "algorithm.scale",
          f"{algo.scale!r} with algorithm.advantage=dr_grpo: Dr.GRPO does not scale advantages (use grpo with a "
          "scale, or scale: none)")  # fmt: skip
    if algo.loss == "pg":
        check(algo.eps_low is None and algo.eps_high is None, "algorithm.eps_low/eps_high",
              "algorithm.loss=pg has no ratio to clip; leave them unset")  # fmt: skip
    check(algo.eps_low is None or 0 <= algo.eps_low <= 1, "algorithm.eps_low", "must be in [0, 1]")
    check(algo.eps_high is None or algo.eps_high >= 0, "algorithm.eps_high", "must be >= 0")
    check(algo.dual_clip is None or algo.loss == "ppo", "algorithm.dual_clip",
          f"only algorithm.loss=ppo has a dual clip (loss is {algo.loss!r})")  # fmt: skip
    check(algo.dual_clip is None or algo.dual_clip > 1, "algorithm.dual_clip", "must be > 1")
    check(algo.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
    check(algo.entropy_coef >= 0, "algorithm.entropy_coef", "must be >= 0")
    check(not (algo.kl_coef > 0 and not lora.enabled), "algorithm.kl_coef",
          "KL to the reference needs LoRA (the reference is the model with adapters off)")  # fmt: skip
    check(algo.updates_per_batch >= 1, "algorithm.updates_per_batch", "must be >= 1")
    check(algo.max_refills >= 0, "algorithm.max_refills", "must be >= 0")
    check(0 <= algo.overlong_buffer <= r.max_new_tokens, "algorithm.overlong_buffer",
          f"must be in [0, rollout.max_new_tokens={r.max_new_tokens}]")  # fmt: skip
    check(algo.overlong_penalty >= 0, "algorithm.overlong_penalty", "must be >= 0")
    check(algo.tis_cap is None or algo.tis_cap > 0, "algorithm.tis_cap", "must be > 0 (or null: off)")
    check(algo.seq_mask_hi is None or algo.seq_mask_hi >= 1, "algorithm.seq_mask_hi", "must be >= 1 (or null: off)")
    # model: memory options
    m = config.model
    check(not m.offload_activations or m.gradient_checkpointing, "model.offload_activations",
          "needs model.gradient_checkpointing=true (it offloads the inputs checkpointed layers save)")  # fmt: skip
    check(not m.offload_embeddings or lora.enabled, "model.offload_embeddings",
          "needs lora.enabled=true: the table stays frozen on the CPU (full fine-tuning trains it)")  # fmt: skip
    check(not (m.offload_embeddings and (r.cuda_graphs or r.torch_compile)), "model.offload_embeddings",
          "cannot run with rollout.cuda_graphs or rollout.torch_compile: the rows are gathered on the host, which a "
          "captured or compiled decode step cannot hold; turn those off")  # fmt: skip
    check(m.moe_chunk_tokens is None or m.moe_chunk_tokens >= 1, "model.moe_chunk_tokens", "must be >= 1 (or null)")
    # optimizer
    check(finite(opt.lr) and opt.lr > 0, "optim.lr", "must be a finite number > 0")
    check(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), "optim.betas", "needs two numbers in [0, 1)")
    check(finite(opt.weight_decay) and opt.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(opt.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    check(finite(opt.max_grad_norm) and opt.max_grad_norm > 0, "optim.max_grad_norm", "must be a finite number > 0")
    check(opt.micro_batch_tokens >= 1, "optim.micro_batch_tokens", "must be >= 1")
    # LoRA
    check(lora.r >= 1, "lora.r", "must be >= 1")
    check(finite(lora.alpha) and lora.alpha > 0, "lora.alpha", "must be > 0")
    check(0 <= lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    check(not unknown, "lora.targets", f"{unknown} are not LoRA targets; choose from {list(LORA_TARGETS)}")
    check(not (lora.enabled and not lora.targets), "lora.targets", "empty: LoRA needs at least one target")
    # warm start, task, checkpoints
    check(0.0 <= warm.tool_fraction <= 1.0, "warmup.tool_fraction", "must be in [0, 1]")
    # (with warmup.steps <= 0 there is no warm start, and tool_first_steps is moot)
    check(warm.tool_first_steps >= 0 and (warm.steps <= 0 or warm.tool_first_steps <= warm.steps),
          "warmup.tool_first_steps", f"must be in [0, warmup.steps={warm.steps}]")  # fmt: skip
    check(config.task.eval_limit is None or config.task.eval_limit >= 1, "task.eval_limit", "must be >= 1 (or null)")
    check(config.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    par = config.parallel
    for name in ("dp_replicate", "dp_shard", "sp"):
        value = getattr(par, name)
        check(value >= 1 or value == -1, f"parallel.{name}", f"must be >= 1 or -1 (all remaining ranks); got {value}")
    check([par.dp_replicate, par.dp_shard, par.sp].count(-1) <= 1, "parallel",
          "at most one of dp_replicate, dp_shard, sp may be -1")  # fmt: skip
    check(finite(par.timeout_s) and par.timeout_s > 0, "parallel.timeout_s", "must be a finite number of seconds > 0")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "invalid config:\n  " + "\n  ".join(problems))
