"""``ossrl export``: merge a LoRA adapter into its base and write an HF gpt-oss checkpoint (dense or MXFP4 experts).

The base is streamed: tensors are read one at a time from its safetensors (``safe_open``), each tensor the adapter
touches is merged in fp32 and cast once to the output dtype (or re-quantized to MXFP4), and the shards are written one
after the other, so peak memory is about one shard plus the tensor being merged, never the whole model. Expert
matrices are merged one expert at a time.

The merge is exactly what the unmerged adapters compute (``ossrl.model.lora``), with scale = alpha / r:
- attention projections and the router, W [out, in] (nn.Linear's layout): W + scale * B @ A (A [r, in], B [out, r]);
- experts, W [E, in, out] (the layout the expert GEMMs multiply tokens with): W_e + scale * A_e @ B_e per expert,
  A_e [in, r], B_e [r, out] read from PEFT's stacked form (lora_A [E * r, in] expert-major, lora_B [out, r * E]
  rank-major).

The output is what ``GptOss.from_pretrained`` and transformers' ``GptOssForCausalLM.from_pretrained`` read:
config.json (the base's, with the output dtype and, for MXFP4, the release's ``quantization_config``), the base's
other files (tokenizer, chat template, generation config, ...), ``model-0000i-of-0000n.safetensors`` shards of at most
``max_shard_size`` each (a single larger tensor gets a shard of its own) and ``model.safetensors.index.json``.
Norm weights and attention sinks are written in fp32 (as ``save_pretrained`` does); with ``mxfp4`` the expert
matrices are E2M1 blocks + E8M0 scales in the release's layout, and experts the adapter leaves alone in an MXFP4 base
are copied bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ossrl.model.checkpoint import (
    INDEX_FILE,
    MXFP4_QUANTIZATION_CONFIG,
    MXFP4_SUFFIXES,
    keeps_fp32,
    resolve_checkpoint_dir,
    weight_files,
)
from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss
from ossrl.model.lora import (
    ATTENTION_TARGETS,
    CONFIG_FILE,
    EXPERT_TARGETS,
    ROUTER_TARGET,
    WEIGHTS_FILE,
    _peft_names,
    config_from_peft,
)
from ossrl.model.mxfp4 import BLOCK, dequantize_mxfp4, quantize_mxfp4

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# files of the base that are not copied: its weights (rewritten) and config.json (rewritten with the output dtype)
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|ckpt|h5|msgpack)|.*\.index\.json|config\.json")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


def parse_size(size: str | int) -> int:
    """Bytes from ``5GB`` (10**9, as transformers' ``max_shard_size``), ``500MiB`` (2**20), ``2MB`` or a plain int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(str(size))
        if match is None:
            raise ValueError(f"max shard size must be bytes or a size like '5GB' or '500MiB'; got {size!r}")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower().removesuffix("b")])
    if value <= 0:
        raise ValueError(f"max shard size must be positive; got {size!r}")
    return value


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}; got {dtype!r}")
    return DTYPES[name]


@dataclass
class ExportResult:
    """What ``export_checkpoint`` wrote. ``rounding_error`` (with an adapter): how far the written weights are from
    the exact fp32 merge, relative to the adapter's update, over every merged tensor:
    ||written - (W + update)|| / ||update||. Near 0 in fp32; it grows when the update is small next to the spacing of
    the output's values (bf16 has 8 significant bits, MXFP4 experts 2): at 1 the rounding is as large as the update."""

    path: Path
    shards: list[str]
    total_bytes: int
    dtype: torch.dtype
    mxfp4: bool
    merged: list[str] = field(default_factory=list)
    rounding_error: float | None = None


@dataclass
class _Tensor:
    """One weight of the base: a dense tensor, or an expert matrix stored as MXFP4 blocks + scales."""

    name: str
    shape: tuple[int, ...]  # the model's shape ([E, in, out] for expert matrices)
    files: dict[str, Path]  # "dense" -> file, or "blocks"/"scales" -> file

    @property
    def packed(self) -> bool:
        return "blocks" in self.files

    @property
    def is_expert_matrix(self) -> bool:
        return self.name.endswith(("experts.gate_up_proj", "experts.down_proj"))


@dataclass
class _Lora:
    """The adapter's factors for one base tensor (PEFT names and on-disk layout)."""

    name_a: str
    name_b: str
    scale: float


def export_checkpoint(
    base: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    mxfp4: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> ExportResult:
    """Write ``base`` (a checkpoint directory or Hub id) with ``adapter`` (a PEFT LoRA directory, optional) merged
    into it, as an HF checkpoint in ``out``. ``dtype``: of the output (default: the base's, bfloat16 for gpt-oss;
    norms and sinks stay fp32); ``mxfp4``: expert matrices as MXFP4 blocks + scales; ``device``: where the merge and
    quantization run (quantizing runs at ~7M weights/s on 2 CPU cores: ~45 min for gpt-oss-20b's experts; a GPU is
    the place for that). Everything is checked before the first byte is written: missing files, tensors, shapes, an
    adapter for another model."""
    out_dtype = None if dtype is None else parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    device = torch.device(device)
    base_dir = resolve_checkpoint_dir(base)
    out_dir = Path(out).expanduser()
    config = GptOssConfig.from_json(base_dir / "config.json")
    raw_config = json.loads((base_dir / "config.json").read_text())
    adapter_dir = None if adapter is None else Path(adapter).expanduser()
    _check_out_dir(out_dir, [base_dir, *([adapter_dir] if adapter_dir else [])], overwrite)

    with ExitStack() as stack:
        files = weight_files(base_dir)
        handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in sorted(set(files.values()))}
        tensors = _base_tensors(base_dir, config, files, handles)
        if out_dtype is None:
            embed = tensors["model.embed_tokens.weight"].files["dense"]
            stored = handles[embed].get_slice("model.embed_tokens.weight").get_dtype()
            out_dtype = _STORED_DTYPES.get(stored, torch.bfloat16)
        if mxfp4:
            for t in tensors.values():
                if t.is_expert_matrix and t.shape[1] % BLOCK:
                    raise ValueError(f"{base_dir}: {t.name} {list(t.shape)} cannot be stored in MXFP4: its input "
                                     f"dim {t.shape[1]} is not a multiple of {BLOCK}")  # fmt: skip
        loras: dict[str, _Lora] = {}
        adapter_handle = None
        if adapter_dir is not None:
            config_path, weights_path = _adapter_files(adapter_dir)
            adapter_handle = stack.enter_context(safe_open(weights_path, framework="pt"))
            loras = _adapter_loras(config_path, weights_path, config, tensors, adapter_handle)

        order = sorted(tensors, key=_natural_key)
        sizes = {n: sum(_nbytes(s, d) for _, s, d in _outputs(tensors[n], mxfp4, out_dtype)) for n in order}
        shards: list[list[str]] = [[]]
        shard_bytes = 0
        for name in order:
            if shards[-1] and shard_bytes + sizes[name] > max_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append(name)
            shard_bytes += sizes[name]
        shard_files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
            stale.unlink(missing_ok=True)  # --overwrite: weights of an earlier export must not mix with these
        _write_config(out_dir, raw_config, out_dtype, mxfp4)
        copied = _copy_base_files(base_dir, out_dir)
        if not any(name.startswith("tokenizer") for name in copied):
            log.warning("%s has no tokenizer files; %s will have none either", base_dir, out_dir)

        merger = _Merger(handles, adapter_handle, out_dtype, mxfp4, device)
        weight_map: dict[str, str] = {}
        total = 0
        for i, (names, file) in enumerate(zip(shards, shard_files, strict=True), start=1):
            shard: dict[str, torch.Tensor] = {}
            for name in names:
                shard.update(merger.produce(tensors[name], loras.get(name)))
            save_file(shard, out_dir / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            total += _bytes(shard)
            log.info("export: wrote %s (%d/%d, %.2f GB)", file, i, len(shards), _bytes(shard) / 1e9)
            del shard
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))  # written last: its presence means complete

    error = None
    if merger.update_sq > 0:
        error = math.sqrt(merger.error_sq / merger.update_sq)
        if error >= 0.5:
            log.warning("export: rounding to %s%s moves the merged weights %.2fx as far as the adapter's update: the "
                        "export keeps little of the adapter (--dtype float32%s keeps it)",
                        str(out_dtype).removeprefix("torch."), " and MXFP4 experts" if mxfp4 else "", error,
                        " without --mxfp4" if mxfp4 else "")  # fmt: skip
    log.info("export: %s -> %s (%s%s, %d shards%s)", base_dir, out_dir, str(out_dtype).removeprefix("torch."),
             ", MXFP4 experts" if mxfp4 else "", len(shards),
             f", {len(loras)} tensors merged from {adapter_dir}" if adapter_dir else "")  # fmt: skip
    return ExportResult(out_dir, shard_files, total, out_dtype, mxfp4, sorted(loras), error)


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---- checks --------------------------------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    for source in inputs:
        if out_dir.resolve() == source.resolve():
            raise ValueError(f"--out {out_dir} is an input of the export ({source}); choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out_dir} is not empty; pass --overwrite to replace the checkpoint in it")


def _base_tensors(directory: Path, config: GptOssConfig, files: dict[str, Path], handles: dict) -> dict[str, _Tensor]:
    """The base's weights by the model's names, each shape checked against the config (as ``load_weights`` does)."""
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in GptOss(config).named_parameters()}
    tensors: dict[str, _Tensor] = {}
    unexpected = []
    for stored, file in files.items():
        name, part = stored, "dense"
        if stored.endswith(MXFP4_SUFFIXES) and stored[: -len("_blocks")].endswith(EXPERT_TARGETS):
            name, part = stored[: -len("_blocks")], stored[-len("blocks") :]
        if name not in expected:
            unexpected.append(stored)
            continue
        tensors.setdefault(name, _Tensor(name, expected[name], {})).files[part] = file
        e, fan_in, fan_out = expected[name] if part != "dense" else (0, 0, 0)
        want = {"dense": expected[name], "blocks": (e, fan_out, fan_in // BLOCK, BLOCK // 2),
                "scales": (e, fan_out, fan_in // BLOCK)}[part]  # fmt: skip
        shape = tuple(handles[file].get_slice(stored).get_shape())
        if shape != tuple(want):
            raise ValueError(f"{file}: tensor {stored} has shape {list(shape)}, expected {list(want)}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{directory}: checkpoint is missing {len(missing)} tensors: {_names(missing)}")
    if unexpected:
        raise ValueError(f"{directory}: checkpoint has {len(unexpected)} unexpected tensors: {_names(unexpected)}")
    for t in tensors.values():
        if "dense" in t.files and len(t.files) > 1:
            raise ValueError(f"{directory}: {t.name} is stored both dense and as MXFP4")
        if t.files.keys() in ({"blocks"}, {"scales"}):
            raise ValueError(f"{directory}: {t.name} has MXFP4 {list(t.files)} but needs both blocks and scales")
    return tensors


def _adapter_files(directory: Path) -> tuple[Path, Path]:
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter {directory}: no {path.name} (a PEFT adapter directory has "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE})")  # fmt: skip
    return config_path, weights_path


def _adapter_loras(
    config_path: Path, weights_path: Path, config: GptOssConfig, tensors: dict[str, _Tensor], handle
) -> dict[str, _Lora]:
    """Base tensor name -> its LoRA factors; every factor must be in the file with the shape the base needs, and
    nothing else (an adapter trained on another model fails here, naming the tensor)."""
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON: {err}") from err
    lora = config_from_peft(data, str(config_path))
    named = data.get("base_model_name_or_path")
    trained_on = f"; {CONFIG_FILE} names its base: {named}" if named else ""
    loras: dict[str, _Lora] = {}
    for i in range(config.num_hidden_layers):
        for target in lora.targets:
            if target in ATTENTION_TARGETS:
                base = f"model.layers.{i}.self_attn.{target}.weight"
            elif target == ROUTER_TARGET:
                base = f"model.layers.{i}.mlp.router.weight"
            else:
                base = f"model.layers.{i}.mlp.experts.{target}"
            loras[base] = _Lora(*_peft_names(i, target, lora.targets), lora.scale)
    stored = set(handle.keys())
    wanted = {n for f in loras.values() for n in (f.name_a, f.name_b)}
    missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: does not fit the base ({config.num_hidden_layers} layers, targets {list(lora.targets)} "
            f"from {CONFIG_FILE}): missing {len(missing)} LoRA tensors {missing[:4]}, unexpected {len(unexpected)} "
            f"{unexpected[:4]}{trained_on}"
        )
    for base, factors in loras.items():
        shape = tensors[base].shape
        if tensors[base].is_expert_matrix:  # W [E, in, out]: A [E * r, in], B [out, r * E]
            e, fan_in, fan_out = shape
            want_a, want_b = (e * lora.r, fan_in), (fan_out, lora.r * e)
        else:  # W [out, in]: A [r, in], B [out, r]
            want_a, want_b = (lora.r, shape[1]), (shape[0], lora.r)
        for name, want in ((factors.name_a, want_a), (factors.name_b, want_b)):
            got = tuple(handle.get_slice(name).get_shape())
            if got != want:
                raise ValueError(
                    f"{weights_path}: {name} has shape {list(got)}, expected {list(want)} for the base's {base} "
                    f"{list(shape)} (r={lora.r}): the adapter belongs to another model{trained_on}"
                )
    return loras


def _names(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


# ---- writing -------------------------------------------------------------------------------------------------------
def _outputs(t: _Tensor, mxfp4: bool, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The tensors written for base tensor ``t``: name, shape, dtype."""
    if t.is_expert_matrix and mxfp4:
        e, fan_in, fan_out = t.shape
        return [(t.name + "_blocks", (e, fan_out, fan_in // BLOCK, BLOCK // 2), torch.uint8),
                (t.name + "_scales", (e, fan_out, fan_in // BLOCK), torch.uint8)]  # fmt: skip
    return [(t.name, t.shape, torch.float32 if keeps_fp32(t.name) else dtype)]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class _Merger:
    """Reads a base tensor, merges its LoRA (fp32, on ``device``) and returns the tensors to write, on the CPU."""

    def __init__(self, handles: dict, adapter, dtype: torch.dtype, mxfp4: bool, device: torch.device) -> None:
        self.handles, self.adapter, self.dtype, self.mxfp4, self.device = handles, adapter, dtype, mxfp4, device
        self.error_sq = self.update_sq = 0.0  # squared norms: written - exact merge, and the updates

    def factor(self, name: str) -> torch.Tensor:
        return self.adapter.get_tensor(name).to(self.device, torch.float32)

    def account(self, written: torch.Tensor, exact: torch.Tensor, update: torch.Tensor) -> None:
        self.error_sq += (written.float() - exact).square().sum().item()
        self.update_sq += update.square().sum().item()

    def produce(self, t: _Tensor, lora: _Lora | None) -> dict[str, torch.Tensor]:
        if not t.is_expert_matrix:
            value = self.handles[t.files["dense"]].get_tensor(t.name)
            target = torch.float32 if keeps_fp32(t.name) else self.dtype
            if lora is None:
                return {t.name: value.to(target).contiguous()}
            update = (self.factor(lora.name_b) @ self.factor(lora.name_a)) * lora.scale  # B [out, r] @ A [r, in]
            exact = value.to(self.device, torch.float32) + update
            written = exact.to(target)
            self.account(written, exact, update)
            return {t.name: written.cpu().contiguous()}
        if lora is None and t.packed == self.mxfp4:  # nothing to merge, same format: copy (MXFP4 bit for bit)
            if t.packed:
                return {t.name + f"_{part}": self.handles[t.files[part]].get_tensor(t.name + f"_{part}")
                        for part in ("blocks", "scales")}  # fmt: skip
            return {t.name: self.handles[t.files["dense"]].get_tensor(t.name).to(self.dtype).contiguous()}
        return self._experts(t, lora)

    def _experts(self, t: _Tensor, lora: _Lora | None) -> dict[str, torch.Tensor]:
        """An expert matrix W [E, in, out], one expert at a time: read (dequantizing MXFP4), merge, write."""
        e, fan_in, fan_out = t.shape
        if lora is not None:  # PEFT's stacking: A [E*r, in] expert-major, B [out, r*E] rank-major
            a_all, b_all = self.factor(lora.name_a), self.factor(lora.name_b)
            r = a_all.shape[0] // e
        if self.mxfp4:
            blocks = torch.empty(e, fan_out, fan_in // BLOCK, BLOCK // 2, dtype=torch.uint8)
            scales = torch.empty(e, fan_out, fan_in // BLOCK, dtype=torch.uint8)
        else:
            dense = torch.empty(e, fan_in, fan_out, dtype=self.dtype)
        for x in range(e):
            if t.packed:
                packed = [self.handles[t.files[p]].get_slice(f"{t.name}_{p}")[x : x + 1] for p in ("blocks", "scales")]
                w = dequantize_mxfp4(*(p.to(self.device) for p in packed), torch.float32)[0].T  # [in, out]
            else:
                w = self.handles[t.files["dense"]].get_slice(t.name)[x : x + 1][0].to(self.device, torch.float32)
            if lora is not None:  # W_e [in, out] + scale * A_e [in, r] @ B_e [r, out]
                update = (a_all[x * r : (x + 1) * r].T @ b_all[:, x::e].T) * lora.scale
                w = w + update
            if self.mxfp4:
                b, s = quantize_mxfp4(w.T.contiguous())
                blocks[x], scales[x] = b.cpu(), s.cpu()
                if lora is not None:
                    self.account(dequantize_mxfp4(b, s, torch.float32).T, w, update)
            else:
                written = w.to(self.dtype)
                dense[x] = written.cpu()
                if lora is not None:
                    self.account(written, w, update)
        if self.mxfp4:
            return {t.name + "_blocks": blocks, t.name + "_scales": scales}
        return {t.name: dense}


def _write_config(out_dir: Path, raw: dict, dtype: torch.dtype, mxfp4: bool) -> None:
    """The base's config.json as it is (fields we do not model survive), with the output's dtype and format."""
    config = copy.deepcopy(raw)
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    if "dtype" in config:  # transformers v5 writes this key
        config["dtype"] = name
    if mxfp4:
        if (raw.get("quantization_config") or {}).get("quant_method") != "mxfp4":
            config["quantization_config"] = copy.deepcopy(MXFP4_QUANTIZATION_CONFIG)
    else:
        config.pop("quantization_config", None)  # the experts are dense now
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def _copy_base_files(base_dir: Path, out_dir: Path) -> list[str]:
    """Every top-level file of the base but its weights and config: tokenizer, chat template, generation config,
    license, README. Hub snapshots hold links into the cache: the files they point at are copied."""
    copied = []
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and not _NOT_COPIED.fullmatch(path.name):
            shutil.copyfile(path, out_dir / path.name)
            copied.append(path.name)
    return copied


# ---- command line --------------------------------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    """``ossrl export`` (arguments: ``ossrl.cli``): one line on success, one line and exit code 2 for a bad path,
    adapter or option."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = export_checkpoint(
            args.model, args.out, adapter=args.adapter, mxfp4=args.mxfp4, dtype=args.dtype,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite, device=device,
        )  # fmt: skip
    except (ValueError, OSError) as err:
        print(f"ossrl export: {err}", file=sys.stderr)
        return 2
    merged = f"{len(result.merged)} tensors merged from {args.adapter}" if args.adapter else "no adapter"
    form = str(result.dtype).removeprefix("torch.") + (", MXFP4 experts" if result.mxfp4 else "")
    shards = f"{len(result.shards)} shard{'s' if len(result.shards) > 1 else ''}"
    print(f"wrote {result.path}: {shards}, {result.total_bytes / 1e9:.2f} GB, {form}; {merged}")
    return 0
