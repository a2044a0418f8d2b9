"""Reading and writing HF-format gpt-oss checkpoints: config.json + safetensors (single file or sharded with an
index), with expert weights either dense (bf16 releases) or MXFP4 (``*_blocks`` + ``*_scales``, as OpenAI ships).

``GptOss.from_pretrained`` / ``save_pretrained`` are the entry points (they call ``load_weights`` /
``write_checkpoint``); this module works on any module with GptOss's parameter names and config, and never imports
the model (``gpt_oss`` imports it: no cycle)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ossrl.model.mxfp4 import BLOCK, MXFP4Weight

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MXFP4_SUFFIXES = ("_blocks", "_scales")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
HUB_IGNORE = ["original/*", "metal/*"]
# config.json's quantization_config of an MXFP4 checkpoint, as openai/gpt-oss-20b and -120b ship it
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}  # fmt: skip


def keeps_fp32(name: str) -> bool:
    """Parameters kept in fp32 whatever the model's dtype, as released: attention sinks and norm weights."""
    return name.endswith("sinks") or name.endswith("norm.weight")


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{text}: not a checkpoint directory (and not a Hub id like 'openai/gpt-oss-20b')")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE))


def weight_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it; missing shards are an error naming the file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from err
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index}: lists shards that are not in {directory}: {missing}")
        return {name: directory / f for name, f in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        with _reading(single), safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


@contextlib.contextmanager
def _reading(file: Path) -> Iterator[None]:
    """Errors of safetensors itself (a truncated or corrupt shard) become one ValueError that names the file."""
    try:
        yield
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: cannot read this safetensors file ({err}); it is truncated or corrupt: copy or "
                         "download it again") from err  # fmt: skip


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor | nn.Module) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(value, nn.Module):
        delattr(owner, leaf)
        owner.add_module(leaf, value)
    else:
        setattr(owner, leaf, nn.Parameter(value, requires_grad=value.is_floating_point()))


def load_weights(
    model: nn.Module,
    directory: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    keep_mxfp4: bool = True,
    strict: bool = True,
) -> None:
    """Fill ``model`` (built on the meta device, cast to ``dtype``) from the safetensors of ``directory``. MXFP4
    experts stay packed (``MXFP4Weight``) unless ``keep_mxfp4=False``, in which case they are dequantized to
    ``dtype``. Missing tensors are always an error; unexpected ones are an error when ``strict`` (else a warning).
    Shapes are checked tensor by tensor."""
    files = weight_files(directory)
    device = torch.device(device)
    expected = {name: p.shape for name, p in model.named_parameters()}
    expert_mats = {n for n in expected if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    for name in expert_mats:  # the MXFP4 form of [E, in, out] is blocks [E, out, in/32, 16] + scales [E, out, in/32]
        e, fan_in, fan_out = expected[name]
        if fan_in % BLOCK == 0:
            expected[name + "_blocks"] = torch.Size((e, fan_out, fan_in // BLOCK, BLOCK // 2))
            expected[name + "_scales"] = torch.Size((e, fan_out, fan_in // BLOCK))

    loaded: set[str] = set()
    unexpected: list[str] = []
    packed: dict[str, dict[str, torch.Tensor]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with _reading(file), safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                if name not in expected:
                    unexpected.append(name)
                    continue
                shape = f.get_slice(name).get_shape()
                if tuple(shape) != tuple(expected[name]):
                    raise ValueError(f"{file}: tensor {name} has shape {list(shape)}, expected {list(expected[name])}")
                tensor = f.get_tensor(name)
                if name.endswith(MXFP4_SUFFIXES):
                    base = name[: -len("_blocks")]
                    packed.setdefault(base, {})[name[len(base) + 1 :]] = tensor
                    continue
                target = torch.float32 if keeps_fp32(name) else dtype
                _set_tensor(model, name, tensor.to(target))
                loaded.add(name)
    for base, parts in packed.items():
        if set(parts) != {"blocks", "scales"}:
            raise ValueError(f"{directory}: {base} has MXFP4 {sorted(parts)} but needs both blocks and scales")
        if base in loaded:
            raise ValueError(f"{directory}: {base} is stored both dense and as MXFP4")
        weight = MXFP4Weight(parts["blocks"], parts["scales"])
        _set_tensor(model, base, weight if keep_mxfp4 else weight.dequantize(dtype).contiguous())
        loaded.add(base)

    missing = sorted(n for n in model.state_dict() if n not in loaded and not n.endswith((".blocks", ".scales")))
    if missing:
        raise ValueError(f"{directory}: checkpoint is missing {len(missing)} tensors: {_names(missing)}")
    if unexpected:
        message = f"{directory}: checkpoint has {len(unexpected)} unexpected tensors: {_names(sorted(unexpected))}"
        if strict:
            raise ValueError(message)
        log.warning(message)


def _names(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def quantize_experts(model: nn.Module) -> nn.Module:
    """Pack every dense expert matrix into MXFP4 in place, as an MXFP4 checkpoint loads (``MXFP4Weight``, frozen);
    the dense weights are freed. Returns ``model``."""
    for name, param in list(model.named_parameters()):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            _set_tensor(model, name, MXFP4Weight.from_dense(param.detach()))
    return model


def checkpoint_tensors(model: nn.Module, mxfp4: bool) -> dict[str, torch.Tensor]:
    """The tensors of the HF on-disk form, expert matrices as MXFP4 blocks/scales when ``mxfp4``. LoRA adapters
    are not part of the base checkpoint (``ossrl.model.lora.save_peft_adapter`` writes them)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            continue
        is_expert_matrix = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if mxfp4 and is_expert_matrix:
            weight = MXFP4Weight.from_dense(param.detach())
            tensors[name + "_blocks"], tensors[name + "_scales"] = weight.blocks, weight.scales
        else:
            tensors[name] = param.detach()
    for name, module in model.named_modules():
        if isinstance(module, MXFP4Weight):
            if mxfp4:
                tensors[name + "_blocks"], tensors[name + "_scales"] = module.blocks, module.scales
            else:
                tensors[name] = module.dequantize(model.dtype)
    return {name: t.contiguous().cpu() for name, t in tensors.items()}


def write_checkpoint(
    model: nn.Module, path: str | Path, *, mxfp4: bool = False, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """``GptOss.save_pretrained``: config.json + safetensors, sharded with an index past ``max_shard_bytes``."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    if mxfp4:
        config["quantization_config"] = copy.deepcopy(MXFP4_QUANTIZATION_CONFIG)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = checkpoint_tensors(model, mxfp4)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return directory
