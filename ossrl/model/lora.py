"""LoRA adapters for GptOss, kept unmerged, saved and loaded in PEFT's on-disk format.

Every adapted weight W gets out = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r; the base weights are frozen and
never modified, so the rollout engine and the trainer run the same weights, and ``disabled_lora`` gives the reference
policy (the base model) with no second copy in memory. A and B are fp32 whatever the model's dtype (an Adam update at
lr 1e-5 is below bf16's resolution), cast to the input's dtype in each forward; the optimizer states follow them.

Targets: the attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), the experts (``gate_up_proj``,
``down_proj``: one A/B pair per expert, applied inside the grouped expert GEMMs of ``ossrl.kernels.moe``; the base
may be MXFP4) and the ``router``.

On disk (``save_peft_adapter``) the names, shapes and config are PEFT's for transformers' ``GptOssForCausalLM``
(checked against peft 0.21.2, ``peft/tuners/lora/layer.py``: ``ParamWrapper``), so ``PeftModel.from_pretrained``
loads what we write and we load what PEFT writes:
- attention: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r];
- experts and router are ``target_parameters`` (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``,
  ``mlp.router.weight``), wrapped by ParamWrapper. Wrappers on one module nest in the module's parameter order,
  gate_up_proj innermost: with both targeted, gate_up_proj is ``mlp.experts.base_layer.lora_A.weight`` and down_proj
  ``mlp.experts.lora_A.weight``; with one, it is ``mlp.experts.lora_A.weight``. Expert factors are stacked:
  lora_A [E * r, in] expert-major (row e * r + j is row j of A_e), lora_B [out, r * E] rank-major (column j * E + e
  is column j of B_e). The router is ``mlp.router.lora_A.weight`` [r, H] / ``lora_B.weight`` [E, r].
PEFT's ParamWrapper rejects lora_dropout != 0, so dropout is allowed only when no expert or router is targeted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ossrl.kernels import linear
from ossrl.model.gpt_oss import GptOss

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("gate_up_proj", "down_proj")  # in the experts' parameter order, which fixes PEFT's nesting
ROUTER_TARGET = "router"
ALL_TARGETS = (*ATTENTION_TARGETS, *EXPERT_TARGETS, ROUTER_TARGET)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_PEFT_PARAMETER = {"gate_up_proj": "mlp.experts.gate_up_proj", "down_proj": "mlp.experts.down_proj",
                   ROUTER_TARGET: "mlp.router.weight"}  # fmt: skip
# adapter_config.json fields whose non-default values change the math; we refuse them rather than load wrongly
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None,
                "trainable_token_indices": None, "layer_replication": None, "exclude_modules": None}  # fmt: skip


@dataclass
class LoraConfig:
    """r: rank; alpha: the update is scaled by alpha / r; dropout: on the adapter's input (attention targets only;
    in training mode with gradients on, never in rollouts or no-grad passes); targets: any of q_proj, k_proj, v_proj,
    o_proj, gate_up_proj, down_proj (per-expert), router."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora.r must be a positive integer; got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1); got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets must be distinct names from {list(ALL_TARGETS)}; got {list(self.targets)}")
        if self.dropout and set(self.targets) - set(ATTENTION_TARGETS):
            raise ValueError(
                "lora.dropout must be 0 when experts or the router are targeted: PEFT's ParamWrapper (how PEFT adapts "
                f"them) cannot apply dropout, so the adapter could not be loaded there; got dropout={self.dropout}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoraAdapter(nn.Module):
    """The update of a dense weight W [out, in]: A [r, in], B [out, r] (PEFT's lora_A.weight / lora_B.weight)."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, device, dtype) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, device=device, dtype=dtype))
        self.scale, self.dropout, self.active = config.scale, config.dropout, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dropout only where gradients flow: rollouts and no-grad log-prob passes see the policy itself
        if self.dropout and self.training and torch.is_grad_enabled():
            x = F.dropout(x, self.dropout)
        return linear(linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale


class ExpertLoraAdapter(nn.Module):
    """One A/B pair per expert, in the experts' ``x @ W`` layout: A [E, in, r], B [E, r, out]; expert e adds
    x @ A[e] @ B[e] * scale (``ossrl.kernels.moe.grouped_lora``)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, config: LoraConfig, device, dtype):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_experts, in_features, config.r, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, config.r, out_features, device=device, dtype=dtype))
        self.scale, self.active = config.scale, True

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scale


Adapter = LoraAdapter | ExpertLoraAdapter


def _adapter_slots(model: GptOss, targets: tuple[str, ...]) -> Iterator[tuple[int, str, nn.Module, str]]:
    """(layer, target, owning module, attribute holding the adapter) for every adapted weight, in a fixed order."""
    for i, layer in enumerate(model.model.layers):
        for t in targets:
            if t in ATTENTION_TARGETS:
                yield i, t, getattr(layer.self_attn, t), "lora"
            elif t == ROUTER_TARGET:
                yield i, t, layer.mlp.router, "lora"
            else:
                yield i, t, layer.mlp.experts, f"{t.removesuffix('_proj')}_lora"


def lora_adapters(model: nn.Module) -> list[Adapter]:
    return [m for m in model.modules() if isinstance(m, LoraAdapter | ExpertLoraAdapter)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (what the optimizer gets)."""
    return [p for adapter in lora_adapters(model) for p in adapter.parameters()]


@torch.no_grad()
def apply_lora(
    model: GptOss,
    config: LoraConfig,
    *,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> GptOss:
    """Attach fresh adapters in place and freeze every base weight; returns ``model``.

    A is drawn like PEFT's default (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B is zero, so
    the model's output is unchanged until B trains. Adapters are created in ``dtype``: fp32 by default, whatever the
    model's dtype (the forward casts them to the input's dtype), so small updates are not rounded away."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"apply_lora needs a LoraConfig; got {type(config).__name__}")
    if lora_adapters(model):
        raise ValueError("the model already has LoRA adapters; build a fresh model to attach a different set")
    dtype = dtype or torch.float32
    for p in model.parameters():
        p.requires_grad_(False)
    num_experts = model.config.num_local_experts
    for _, target, owner, attr in _adapter_slots(model, config.targets):
        if isinstance(owner, nn.Linear):
            fan_in, device = owner.in_features, owner.weight.device
            adapter: Adapter = LoraAdapter(fan_in, owner.out_features, config, device, dtype)
        elif target == ROUTER_TARGET:
            fan_in, device = owner.weight.shape[1], owner.weight.device
            adapter = LoraAdapter(fan_in, num_experts, config, device, dtype)
        else:
            weight = getattr(owner, target)  # [E, in, out], dense or MXFP4Weight
            fan_in, device = weight.shape[1], owner.gate_up_proj_bias.device
            adapter = ExpertLoraAdapter(num_experts, fan_in, weight.shape[2], config, device, dtype)
        bound = 1.0 / math.sqrt(fan_in)
        adapter.lora_A.uniform_(-bound, bound, generator=generator)
        setattr(owner, attr, adapter)
    model.lora_config = config
    return model


def attached_config(model: GptOss) -> LoraConfig | None:
    """The LoraConfig the model's adapters were attached with, or None without adapters."""
    return getattr(model, "lora_config", None) if lora_adapters(model) else None


@contextmanager
def disabled_lora(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter is switched off inside the block (and restored after, even on error).
    The trainer's reference policy for KL, without a second model in memory."""
    adapters = lora_adapters(model)
    before = [a.active for a in adapters]
    for a in adapters:
        a.active = False
    try:
        yield
    finally:
        for a, was in zip(adapters, before, strict=True):
            a.active = was


# ---- PEFT format -------------------------------------------------------------------------------------------------
def _peft_names(layer: int, target: str, targets: tuple[str, ...]) -> tuple[str, str]:
    if target in ATTENTION_TARGETS:
        module = f"model.layers.{layer}.self_attn.{target}"
    elif target == ROUTER_TARGET:
        module = f"model.layers.{layer}.mlp.router"
    else:  # ParamWrappers nest in parameter order: each later-targeted expert weight wraps the earlier ones
        later = [t for t in EXPERT_TARGETS if t in targets and EXPERT_TARGETS.index(t) > EXPERT_TARGETS.index(target)]
        module = f"model.layers.{layer}.mlp.experts" + ".base_layer" * len(later)
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def peft_state_dict(model: GptOss) -> dict[str, torch.Tensor]:
    """The adapters as PEFT names and lays them out (see the module docstring), detached, on the CPU."""
    config = attached_config(model)
    if config is None:
        raise ValueError("the model has no LoRA adapters (apply_lora or load_peft_adapter first)")
    tensors = {}
    for i, target, owner, attr in _adapter_slots(model, config.targets):
        adapter = getattr(owner, attr)
        name_a, name_b = _peft_names(i, target, config.targets)
        a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
        if isinstance(adapter, ExpertLoraAdapter):  # A [E, in, r] -> [E*r, in]; B [E, r, out] -> [out, r*E]
            e, fan_in, r = a.shape
            a, b = a.permute(0, 2, 1).reshape(e * r, fan_in), b.permute(2, 1, 0).reshape(b.shape[2], r * e)
        tensors[name_a], tensors[name_b] = a.contiguous().cpu(), b.contiguous().cpu()
    return tensors


@torch.no_grad()
def load_peft_state_dict(model: GptOss, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy PEFT-named adapter tensors into the model's attached adapters; every tensor must be there, with its
    shape, and nothing else."""
    config = attached_config(model)
    if config is None:
        raise ValueError("the model has no LoRA adapters to load into (apply_lora first)")
    pairs = {_peft_names(i, t, config.targets): getattr(owner, attr)
             for i, t, owner, attr in _adapter_slots(model, config.targets)}  # fmt: skip
    expected = {name for names in pairs for name in names}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: missing {len(missing)} LoRA tensors {missing[:4]}, unexpected {len(unexpected)} "
            f"{unexpected[:4]} (for r={config.r}, targets={list(config.targets)})"
        )
    for (name_a, name_b), adapter in pairs.items():
        a, b = tensors[name_a], tensors[name_b]
        if isinstance(adapter, ExpertLoraAdapter):  # back from PEFT's stacked form, see peft_state_dict
            e, fan_in, r = adapter.lora_A.shape
            fan_out = adapter.lora_B.shape[2]
            _check_shape(source, name_a, a, (e * r, fan_in))
            _check_shape(source, name_b, b, (fan_out, r * e))
            a, b = a.reshape(e, r, fan_in).permute(0, 2, 1), b.reshape(fan_out, r, e).permute(2, 1, 0)
        else:
            _check_shape(source, name_a, a, tuple(adapter.lora_A.shape))
            _check_shape(source, name_b, b, tuple(adapter.lora_B.shape))
        for param, value in ((adapter.lora_A, a), (adapter.lora_B, b)):
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def _check_shape(source: str, name: str, value: torch.Tensor, want: tuple) -> None:
    if tuple(value.shape) != tuple(want):
        raise ValueError(f"{source}: {name} has shape {list(value.shape)}, expected {list(want)} for this model")


def peft_adapter_config(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json as PEFT writes it for these adapters (fields left out take PEFT's defaults)."""
    modules = [t for t in config.targets if t in ATTENTION_TARGETS]
    parameters = [_PEFT_PARAMETER[t] for t in config.targets if t not in ATTENTION_TARGETS]
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "auto_mapping": None, "inference_mode": True, "r": config.r, "lora_alpha": alpha,
        "lora_dropout": config.dropout, "target_modules": modules or None, "target_parameters": parameters or None,
        "init_lora_weights": True, **_UNSUPPORTED,
    }  # fmt: skip


def config_from_peft(data: dict, source: str = CONFIG_FILE) -> LoraConfig:
    """Our LoraConfig from PEFT's adapter_config.json; options we do not implement are an error, not ignored."""
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type must be 'LORA'; got {data.get('peft_type')!r}")
    for key, default in _UNSUPPORTED.items():
        if data.get(key, default) not in (default, None, {}, [], False):
            raise ValueError(f"{source}: {key}={data[key]!r} is not supported (only plain LoRA: {key}={default!r})")
    modules, parameters = data.get("target_modules") or [], data.get("target_parameters") or []
    if isinstance(modules, str):
        raise ValueError(f"{source}: target_modules as a regex ({modules!r}) is not supported; list module names")
    targets = []
    for m in modules:
        t = m.rpartition(".")[2]
        if t not in ATTENTION_TARGETS:
            raise ValueError(f"{source}: target module {m!r} is not one of {list(ATTENTION_TARGETS)}")
        targets.append(t)
    by_parameter = {v: k for k, v in _PEFT_PARAMETER.items()}
    for p in parameters:
        t = next((t for suffix, t in by_parameter.items() if p == suffix or p.endswith("." + suffix)), None)
        if t is None:
            raise ValueError(f"{source}: target parameter {p!r} is not one of {list(by_parameter)}")
        targets.append(t)
    return LoraConfig(r=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                      targets=tuple(t for t in ALL_TARGETS if t in targets))  # fmt: skip


def save_peft_adapter(model: GptOss, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (in the adapters' dtype, fp32 unless chosen otherwise:
    a resumed run continues from the exact values; PEFT casts on load), loadable by ``PeftModel.from_pretrained``
    on transformers' ``GptOssForCausalLM`` and by ``load_peft_adapter``."""
    tensors = peft_state_dict(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_adapter_config(model.lora_config, base_model_name_or_path)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    return directory


def load_peft_adapter(model: GptOss, directory: str | Path, *, dtype: torch.dtype | None = None) -> GptOss:
    """Load a PEFT LoRA adapter (ours or PEFT's) into ``model``: attaches adapters from its config when the model
    has none (in ``dtype``, default fp32), else checks they match (r, alpha, targets). The values are cast to the
    adapters' dtype (PEFT often saves bf16). Errors name the file and the tensor."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {path.name} (a PEFT adapter directory has {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE})")  # fmt: skip
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON: {err}") from err
    config = config_from_peft(data, str(config_path))
    attached = attached_config(model)
    if attached is None:
        apply_lora(model, config, dtype=dtype)
    elif (attached.r, attached.alpha, set(attached.targets)) != (config.r, config.alpha, set(config.targets)):
        raise ValueError(f"{config_path}: adapter has r={config.r}, alpha={config.alpha}, targets="
                         f"{list(config.targets)} but the model's adapters have r={attached.r}, alpha={attached.alpha},"
                         f" targets={list(attached.targets)}")  # fmt: skip
    with safe_open(weights_path, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    load_peft_state_dict(model, tensors, str(weights_path))
    return model
