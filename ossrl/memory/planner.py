"""``ossrl memory``: the peak GPU memory of a config's rollout and train step, from the real code on shape-only
tensors (no weights read, no GPU needed).

The model is built at the config's shapes (MXFP4 experts packed as released, LoRA attached, the memory options
applied by the same functions the Trainer calls) on the meta device under ``FakeTensorMode``: tensors have shapes,
dtypes and sizes but no data. In planning mode (``ossrl.kernels.common.planning_mode``) the meta device stands for
the GPU: dispatch takes the GPU's paths (Triton sink attention, grouped GEMMs, the MXFP4 kernels), whose probes
answer without running, and the Triton attention allocates its outputs and what it saves (out, lse) but launches
nothing. A ``DeviceTracker`` (``MemTracker``) records the largest total of live device tensors.

What runs for real (on fake tensors): the model's forward (checkpointing, activation offload, CPU embedding table,
chunked MoE), the engine's KV cache layout and allocation (``Engine._layout``, ``PagedKVCache.allocate``) and its
prefill attention step (``CacheStep.attend``), the sampler (``sample_tokens``), the trainer's chunked log-probs
(``token_logprobs``), the policy loss, backward, gradient clipping and AdamW's step. What is laid out by the planner
rather than by the code that normally decides it (that code reads token values on the host, which a shape-only
tensor has none of): the step's sequence lengths (prompt_tokens + the engine's reserve), the prefill batch, the
decode batch (run without the paged-cache read: its partial sums, a few MiB, are not counted) and the micro-batch
(``pack_micro_batches`` over those lengths). Added by arithmetic: activation offload's prefetch of one layer input
(CUDA only, so not run here). See README "ossrl memory".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ossrl.config import ConfigError, TrainConfig, validate
from ossrl.kernels.common import planning_mode
from ossrl.memory.tracker import DeviceTracker
from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss, PackedBatch
from ossrl.model.lora import LoraConfig, apply_lora, disabled_lora, lora_parameters
from ossrl.model.mxfp4 import BLOCK, MXFP4Weight
from ossrl.model.offload import apply_memory_options
from ossrl.train.logprobs import chunk_rows

GIB = 2**30
# Memory a CUDA process has on the GPU besides its tensors (the CUDA context, cuBLAS/Triton workspaces, the caching
# allocator's rounding and fragmentation): what ``fits`` keeps free of the GPU's total.
GPU_OVERHEAD_GIB = 1.0
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_PROMPT_TOKENS = 256  # a GSM8K prompt with the Harmony system message is ~150-250 tokens
# The released models' config.json, as far as the network goes (no download needed for these two).
KNOWN_MODELS = {
    "openai/gpt-oss-20b": {},
    "openai/gpt-oss-120b": {"num_hidden_layers": 36, "num_local_experts": 128},
}


@dataclass
class StepShape:
    """The sizes of one training step the planner lays out (see the module docstring)."""

    prompt_tokens: int
    seq_len: int  # prompt + what a sequence may add (the engine's reserve), capped at the model's context
    seqs: int  # sequences in the step (prompts_per_step * n)
    kv_cache_tokens: int  # the full-attention layers' cache, over all running sequences
    prefill_tokens: int
    prefill_seqs: int
    decode_seqs: int
    micro_batch_tokens: int  # the largest micro-batch of whole sequences
    micro_batch_seqs: int


@dataclass
class MemoryPlan:
    model: str
    dtype: str
    gpu_gib: float | None
    rollout_peak_gib: float
    train_peak_gib: float
    breakdown: dict[str, dict[str, float]]
    shape: dict[str, int]
    fits: bool | None = None  # None: no GPU size given
    max_n: int | None = None  # the largest rollout.n that fits (None: not searched)
    max_context: int | None = None  # the longest sequence (prompt + max_new_tokens) that fits
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return max(self.rollout_peak_gib, self.train_peak_gib)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_gib": self.peak_gib}


# ---- model shapes --------------------------------------------------------------------------------------------------
def model_shapes(path: str) -> tuple[GptOssConfig, bool]:
    """(the network's config, whether its experts are MXFP4) for ``model.path``, without reading weights: the two
    released models by name, a local directory's config.json, "tiny", or a Hub id already in the local cache."""
    if path == "tiny":
        from ossrl.model.tiny import tiny_config

        return tiny_config(_tiny_vocab()), False
    if path in KNOWN_MODELS:
        return GptOssConfig(**KNOWN_MODELS[path]), True
    local = Path(path).expanduser()
    config_file = local / "config.json" if local.is_dir() else None
    if config_file is None and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        config_file = Path(cached) if isinstance(cached, str) else None
    if config_file is None or not config_file.is_file():
        raise ConfigError(f"model.path: {path!r} is not a directory with a config.json, a cached Hub model, "
                          f"'tiny' or one of {list(KNOWN_MODELS)}")  # fmt: skip
    data = json.loads(config_file.read_text())
    return GptOssConfig.from_dict(data, source=str(config_file)), "quantization_config" in data


def _tiny_vocab() -> int:
    import tempfile

    from ossrl.harmony.tiny_tokenizer import build_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return len(build_tiny_tokenizer(Path(tmp)))


def build_model(config: TrainConfig, device: torch.device, *, seed: int | None = None) -> GptOss:
    """The config's model as the Trainer sets it up (dtype, MXFP4 experts, checkpointing, memory options, LoRA) on
    ``device``. On the meta device (inside ``FakeTensorMode``) nothing is allocated; on a real device the weights
    are random (``seed``)."""
    shapes, mxfp4 = model_shapes(config.model.path)
    dtype = DTYPES[config.model.dtype]
    with torch.device("meta"):
        model = GptOss(shapes)
    model.set_dtype(dtype)
    if mxfp4:
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                e, fan_in, fan_out = getattr(experts, name).shape
                groups = fan_in // BLOCK
                weight = MXFP4Weight(torch.empty(e, fan_out, groups, BLOCK // 2, dtype=torch.uint8, device="meta"),
                                     torch.empty(e, fan_out, groups, dtype=torch.uint8, device="meta"))  # fmt: skip
                delattr(experts, name)
                experts.add_module(name, weight)
    _materialize(model, device)
    if device.type != "meta":
        _random_weights(model, seed or 0)
    model.gradient_checkpointing = config.model.gradient_checkpointing
    settings = config.model
    if settings.offload_embeddings and device.type == "meta":
        # ``offload_embeddings`` moves the table with ``.data =``, which cannot turn a meta tensor into a (fake) CPU
        # one; the same move, by replacing the parameter: the table on the host, frozen, rows gathered there
        embed = model.model.embed_tokens
        embed.weight = nn.Parameter(torch.empty_like(embed.weight, device="cpu"), requires_grad=False)
        embed.offloaded = True
        settings = dataclasses.replace(settings, offload_embeddings=False)
    apply_memory_options(model, settings)
    if config.lora.enabled:
        lora = LoraConfig(r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                          targets=tuple(config.lora.targets))  # fmt: skip
        apply_lora(model, lora)
    return model


@torch.no_grad()
def _materialize(model: nn.Module, device: torch.device) -> None:
    """``to_empty`` by hand: new (uninitialised, or under ``FakeTensorMode`` fake) tensors on ``device`` for every
    parameter and buffer (``to_empty`` swaps fake tensors in, which a tensor with a weakref refuses)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device=device)


@torch.no_grad()
def _random_weights(model: GptOss, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dtype == torch.uint8:  # MXFP4: random nibbles, scales near 2^-6
            if name.endswith("scales"):
                t.copy_(torch.randint(118, 124, t.shape, dtype=torch.uint8, generator=generator))
            else:
                t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=generator))
        elif name.endswith("norm.weight"):
            t.fill_(1.0)
        elif t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=generator) * 0.02)


# ---- the step's shapes ---------------------------------------------------------------------------------------------
def step_shape(config: TrainConfig, model_config: GptOssConfig, prompt_tokens: int) -> StepShape:
    """Sizes of one step of ``config`` whose prompts have ``prompt_tokens`` tokens, decided as the engine and the
    trainer decide them."""
    from ossrl.rollout.engine import TOOL_RESULT_SLACK
    from ossrl.rollout.kv_cache import PagedKVCache
    from ossrl.train.batching import pack_micro_batches

    r = config.rollout
    tool_tokens = r.max_tool_tokens + TOOL_RESULT_SLACK if r.max_turns > 1 else 0  # tasks with tools (assumed)
    reserve = r.max_new_tokens + (r.max_turns - 1) * tool_tokens
    seq_len = min(prompt_tokens + reserve, model_config.max_position_embeddings)
    seqs = r.prompts_per_step * r.n
    running = min(seqs, max(r.max_num_seqs, r.n))  # whole requests are admitted while max_num_seqs allows
    running -= running % r.n if running >= r.n else 0
    page = 16
    kv_tokens = r.kv_cache_tokens or running * PagedKVCache.pages_for(seq_len, page) * page
    requests = max(1, min(r.prompts_per_step, 16384 // max(prompt_tokens, 1), max(1, running // r.n)))
    micro = pack_micro_batches([seq_len] * seqs, config.optim.micro_batch_tokens)
    largest = max(micro, key=len)
    return StepShape(
        prompt_tokens=prompt_tokens, seq_len=seq_len, seqs=seqs, kv_cache_tokens=kv_tokens,
        prefill_tokens=requests * min(prompt_tokens, seq_len - 1), prefill_seqs=requests, decode_seqs=running,
        micro_batch_tokens=len(largest) * seq_len, micro_batch_seqs=len(largest),
    )  # fmt: skip


def _state(model: GptOss, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What lives across phases: weights, buffers, gradients and optimizer states."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    states = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return [*model.parameters(), *model.buffers(), *grads, *states]


# ---- the two phases ------------------------------------------------------------------------------------------------
def _ids(count: int, vocab: int, device: torch.device) -> torch.Tensor:
    if device.type == "meta":
        return torch.empty(count, dtype=torch.long, device=device)
    return torch.randint(0, vocab, (count,), device=device)


def _packed(lengths: list[int], vocab: int, device: torch.device) -> PackedBatch:
    cu = torch.tensor([0, *[sum(lengths[: i + 1]) for i in range(len(lengths))]], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    return PackedBatch(_ids(sum(lengths), vocab, device), cu, max(lengths), positions)


def _optimizer(config: TrainConfig, model: GptOss) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """The Trainer's AdamW, in its steady state: states allocated by one step and the gradients of the last update
    still held (the Trainer clears them only at the next update's start)."""
    params = lora_parameters(model) if config.lora.enabled else [p for p in model.parameters() if p.requires_grad]
    opt = config.optim
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return params, optimizer


@torch.no_grad()
def rollout_phase(model: GptOss, config: TrainConfig, shape: StepShape, optimizer, tracker: DeviceTracker) -> int:
    """The engine's KV cache, its largest prefill and one decode step (forward, logits, sampling); returns the KV
    cache's bytes."""
    from ossrl.rollout.engine import Engine
    from ossrl.rollout.kv_cache import CacheStep
    from ossrl.rollout.sampling import SamplingParams, sample_tokens

    r = config.rollout
    device, vocab = model.lm_head.weight.device, model.config.vocab_size
    engine = Engine(model, None, max_num_seqs=r.max_num_seqs, kv_cache_tokens=shape.kv_cache_tokens)
    cache = engine._layout(max(r.max_num_seqs, r.n))
    model.eval()
    tracker.register(_state(model, optimizer))
    with tracker:
        with warnings.catch_warnings():  # the cache notes its tensors' addresses (fake ones have none)
            warnings.simplefilter("ignore", UserWarning)
            cache.allocate()
        # the largest prefill: one leader per request, all prompt tokens at once (fresh: varlen attention)
        lengths = [shape.prefill_tokens // shape.prefill_seqs] * shape.prefill_seqs
        batch = _packed(lengths, vocab, device)
        batch.kv_cache = _prefill_step(CacheStep, cache, lengths, device)
        hidden = model.forward_packed(batch)
        last = torch.tensor([sum(lengths[: i + 1]) - 1 for i in range(len(lengths))], device=device)
        logits = model.lm_head(hidden[last]).float()
        del hidden, batch, logits
        # one decode step over every running sequence
        batch = _packed([1] * shape.decode_seqs, vocab, device)
        logits = model.lm_head(model.forward_packed(batch)).float()
        params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p)
        seeds = torch.zeros(shape.decode_seqs, dtype=torch.long, device=device)
        sample_tokens(logits, params, seeds, seeds)
        del logits, batch
    nbytes = cache.nbytes
    cache.free()
    return nbytes


def _prefill_step(cache_step_cls, cache, lengths: list[int], device: torch.device):
    """The engine's ``CacheStep`` for a fresh prefill of ``lengths`` tokens per sequence, its index tensors laid out
    directly (``plan_step`` computes the same slots from page tables on the host)."""
    step = cache_step_cls.__new__(cache_step_cls)
    window = cache.window
    stored = [min(n, window - 1) for n in lengths]
    keep, row = [], 0
    for n, s in zip(lengths, stored, strict=True):
        keep.extend(range(row + n - s, row + n))
        row += n
    step.cache, step.fresh, step.max_q_len = cache, True, max(lengths)
    step.full_slots = torch.arange(sum(lengths), device=device)
    step.sliding_slots = torch.arange(len(keep), device=device)
    step.sliding_keep = torch.tensor(keep, dtype=torch.long, device=device)
    step.cu_q_lens = torch.tensor([0, *[sum(lengths[: i + 1]) for i in range(len(lengths))]], dtype=torch.int32,
                                  device=device)  # fmt: skip
    step.seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return step


def train_phase(model: GptOss, config: TrainConfig, shape: StepShape, params, optimizer, tracker: DeviceTracker):
    """One micro-batch (the largest) through ``micro_batch_loss``'s steps: forward with checkpointing as configured,
    chunked log-probs, the policy loss (and the KL reference forward), backward; then clipping and AdamW's step."""
    from ossrl import rl
    from ossrl.train.logprobs import token_logprobs

    algo, r = config.algorithm, config.rollout
    device, vocab = model.lm_head.weight.device, model.config.vocab_size
    lengths = [shape.seq_len] * shape.micro_batch_seqs
    sampled = shape.seq_len - shape.prompt_tokens  # per sequence
    model.train()
    optimizer.zero_grad(set_to_none=True)  # the update's start (the last update's gradients are dropped)
    tracker.register(_state(model, optimizer))
    with tracker:
        batch = _packed(lengths, vocab, device)
        index = torch.cat([torch.arange(shape.prompt_tokens, n, device=device) + i * n for i, n in enumerate(lengths)])
        seq_index = torch.repeat_interleave(torch.arange(len(lengths), device=device), sampled)
        targets = batch.input_ids[index]
        lp, entropy = token_logprobs(model.lm_head, model.forward_packed(batch)[index - 1], targets,
                                     temperature=r.temperature, entropy_grad=algo.entropy_coef > 0)  # fmt: skip
        mask = torch.ones_like(lp, dtype=torch.bool)
        layout = {"seq_index": seq_index, "num_seqs": len(lengths)}
        kwargs: dict = {"agg": algo.agg, "max_len": r.max_new_tokens, "normalizer": float(lp.numel()), **layout}
        loss, _ = rl.get_policy_loss(algo.loss)(lp, lp.detach(), torch.zeros(len(lengths), device=device), mask,
                                                **kwargs)  # fmt: skip
        if algo.kl_coef > 0:
            with torch.no_grad(), disabled_lora(model):
                ref, _ = token_logprobs(model.lm_head, model.forward_packed(batch)[index - 1], targets,
                                        temperature=r.temperature)  # fmt: skip
            loss = loss + algo.kl_coef * rl.kl_loss(
                lp,
                ref,
                mask,
                kind=algo.kl_kind,
                agg=algo.agg,
                max_len=r.max_new_tokens,
                normalizer=float(lp.numel()),
                **layout,
            )
        if algo.entropy_coef > 0:
            loss = loss + rl.entropy_bonus(entropy, mask, algo.entropy_coef, agg=algo.agg, max_len=r.max_new_tokens,
                                           normalizer=float(lp.numel()), **layout)  # fmt: skip
        loss.backward()
        del loss, lp, entropy, batch
        torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
        optimizer.step()


# ---- the plan ------------------------------------------------------------------------------------------------------
class Planner:
    """Plans of one config's model for several step shapes (the model is built once)."""

    def __init__(self, config: TrainConfig) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        validate(config)
        self.config = config
        self.model_config, self.mxfp4 = model_shapes(config.model.path)
        self.device = torch.device("meta")
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        with self.fake, planning_mode():
            self.model = build_model(config, self.device)
            self.params, self.optimizer = _optimizer(config, self.model)
        self.adapter_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in [*self.model.parameters(),
                                *self.model.buffers()] if t.device.type == "meta") - self.adapter_bytes  # fmt: skip

    def plan(self, config: TrainConfig | None = None, *, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
             gpu_gib: float | None = None) -> MemoryPlan:  # fmt: skip
        """The plan of ``config`` (default: the planner's; only rollout/optim/algorithm may differ from it)."""
        config = config or self.config
        shape = step_shape(config, self.model_config, prompt_tokens)
        with self.fake, planning_mode():
            rollout, train = DeviceTracker(self.device), DeviceTracker(self.device)
            kv_bytes = rollout_phase(self.model, config, shape, self.optimizer, rollout)
            train_phase(self.model, config, shape, self.params, self.optimizer, train)
        train_peak = train.peak + _prefetch_bytes(config, self.model_config, shape)
        return self._plan(config, shape, rollout.peak, train_peak, kv_bytes, gpu_gib)

    def _plan(self, config, shape, rollout: int, train: int, kv_bytes: int, gpu_gib: float | None) -> MemoryPlan:
        # AdamW keeps two fp32 states per trainable value, and the update a gradient of each
        adapters_opt = self.adapter_bytes + sum(
            t.numel() * t.element_size() for st in self.optimizer.state.values() for t in st.values()
            if isinstance(t, torch.Tensor) and t.device == self.device
        ) + self.adapter_bytes  # fmt: skip

        def parts(peak: int, kv: int) -> dict[str, float]:
            act = peak - self.weight_bytes - adapters_opt - kv
            return {"weights": self.weight_bytes / GIB, "adapters_optimizer": adapters_opt / GIB, "kv_cache": kv / GIB,
                    "activations": act / GIB}  # fmt: skip

        breakdown = {"rollout": parts(rollout, kv_bytes), "train": parts(train, 0)}
        breakdown["train"]["logits_chunk"] = _logits_chunk_bytes(self.model_config, shape, config) / GIB
        plan = MemoryPlan(
            model=config.model.path, dtype=config.model.dtype, gpu_gib=gpu_gib, rollout_peak_gib=rollout / GIB,
            train_peak_gib=train / GIB, breakdown=breakdown, shape=asdict(shape),
        )  # fmt: skip
        if gpu_gib is not None:
            plan.fits = plan.peak_gib <= gpu_gib - GPU_OVERHEAD_GIB
        r = config.rollout
        if r.kv_cache_tokens is not None and r.kv_cache_tokens < r.n * shape.seq_len:
            plan.fits = False if gpu_gib is not None else None
            plan.notes.append(f"rollout.kv_cache_tokens={r.kv_cache_tokens} cannot hold a request's {r.n} sequences "
                              f"of up to {shape.seq_len} tokens: the engine would refuse every request; raise it to "
                              f"at least {r.n * shape.seq_len}")  # fmt: skip
        if config.deterministic:
            plan.notes.append("deterministic: true runs batch-invariant kernels, which read lengths on the host and "
                              "cannot run on shape-only tensors: planned with the fast kernels")  # fmt: skip
        if config.rollout.kv_cache_tokens is None:
            plan.notes.append("kv_cache: what the step's running sequences need; with rollout.kv_cache_tokens unset "
                              "the engine takes 90% of the GPU memory free at the first rollout (more is faster, "
                              "never needed)")  # fmt: skip
        return plan


def measure(config: TrainConfig, device: torch.device | str, *, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
            seed: int = 0) -> dict[str, float]:  # fmt: skip
    """The planned phases run for real: random weights at the config's shapes on ``device`` (MXFP4 experts from
    random bytes), the same rollout and train pieces, peaks in GiB as the tracker counts them (``rollout``, ``train``)
    and, on CUDA, as ``torch.cuda.max_memory_allocated`` sees them (``cuda_rollout``, ``cuda_train``). What the
    planner is checked against (tests on CPU, ``benchmarks/memory.py`` on a GPU)."""
    device = torch.device(device)
    validate(config)
    model = build_model(config, device, seed=seed)
    params, optimizer = _optimizer(config, model)
    shape = step_shape(config, model.config, prompt_tokens)
    out: dict[str, float] = {}
    for phase in ("rollout", "train"):
        tracker = DeviceTracker(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if phase == "rollout":
            rollout_phase(model, config, shape, optimizer, tracker)
        else:
            train_phase(model, config, shape, params, optimizer, tracker)
        out[phase] = tracker.peak / GIB
        if device.type == "cuda":
            out[f"cuda_{phase}"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def _prefetch_bytes(config: TrainConfig, model_config: GptOssConfig, shape: StepShape) -> int:
    """Activation offload on CUDA copies layer i-1's input back while layer i runs its backward (``ActivationOffload``
    prefetches only on CUDA, so the meta run does not): one more [tokens, hidden] layer input on the GPU. Added to the
    train peak by arithmetic."""
    if not (config.model.offload_activations and config.model.gradient_checkpointing):
        return 0
    return shape.micro_batch_tokens * model_config.hidden_size * torch.finfo(DTYPES[config.model.dtype]).bits // 8


def _logits_chunk_bytes(model_config: GptOssConfig, shape: StepShape, config: TrainConfig) -> int:
    """One log-prob chunk's logits in the train step (the largest part of ``token_logprobs``): [rows, vocab] in the
    model's dtype and in fp32, and the fp32 softmax (``chunk_rows`` rows a chunk)."""
    rows = min(chunk_rows(model_config.vocab_size), shape.micro_batch_seqs * (shape.seq_len - shape.prompt_tokens))
    dtype = DTYPES[config.model.dtype]
    return rows * model_config.vocab_size * (torch.finfo(dtype).bits // 8 + 8)


def _with(config: TrainConfig, **fields: Any) -> TrainConfig | None:
    out = copy.deepcopy(config)
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        setattr(getattr(out, section), name, value)
    try:
        validate(out)
    except ConfigError:
        return None
    return out


def _largest(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest value in [lo, hi] for which ``fits`` holds (assumed monotone), by doubling then bisection."""
    if not fits(lo):
        return None
    best, step = lo, lo
    while best < hi:
        nxt = min(hi, best + step)
        if not fits(nxt):
            hi = nxt - 1
            break
        best, step = nxt, step * 2
    while best < hi:
        mid = (best + hi + 1) // 2
        if fits(mid):
            best = mid
        else:
            hi = mid - 1
    return best


def plan(
    config: TrainConfig,
    gpu_gib: float | None = None,
    *,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    search: bool = True,
    progress: Callable[[str], None] | None = None,
) -> MemoryPlan:
    """The memory plan of ``config`` on a GPU of ``gpu_gib`` GiB (None: no fit verdict, no search). With ``search``
    (and a GPU size), also the largest ``rollout.n`` and the longest sequence that fit, found by planning again
    (about a dozen plans, bounded), each with the KV cache sized for its sequences."""
    planner = Planner(config)
    result = planner.plan(prompt_tokens=prompt_tokens, gpu_gib=gpu_gib)
    if gpu_gib is None or not search:
        return result
    budget = gpu_gib - GPU_OVERHEAD_GIB
    say = progress or (lambda _: None)

    def fits_n(n: int) -> bool:
        candidate = _with(
            config,
            rollout__n=n,
            rollout__max_num_seqs=max(config.rollout.max_num_seqs, n),
            rollout__kv_cache_tokens=None,
        )  # the cache sized for the sequences (as the engine needs)
        say(f"planning rollout.n={n}")
        return candidate is not None and planner.plan(candidate, prompt_tokens=prompt_tokens).peak_gib <= budget

    def fits_context(tokens: int) -> bool:
        candidate = _with(config, rollout__max_new_tokens=tokens - prompt_tokens, rollout__kv_cache_tokens=None,
                          optim__micro_batch_tokens=max(config.optim.micro_batch_tokens, tokens))  # fmt: skip
        say(f"planning a {tokens}-token sequence")
        return candidate is not None and planner.plan(candidate, prompt_tokens=prompt_tokens).peak_gib <= budget

    result.max_n = _largest(fits_n, 2, 1024)
    granule = 1024
    longest = planner.model_config.max_position_embeddings // granule
    found = _largest(lambda k: fits_context(k * granule), 1, longest) if prompt_tokens < granule else None
    result.max_context = found * granule if found else None
    return result


def describe(plan_: MemoryPlan) -> list[str]:
    """The plan as lines of text (what ``ossrl memory`` prints)."""
    s = plan_.shape
    lines = [f"{plan_.model} ({plan_.dtype}): a step of {s['seqs']} sequences of up to {s['seq_len']} tokens "
             f"(prompt {s['prompt_tokens']}); micro-batch {s['micro_batch_tokens']} tokens "
             f"({s['micro_batch_seqs']} seq); KV cache {s['kv_cache_tokens']} tokens"]  # fmt: skip
    names = ["weights", "adapters_optimizer", "kv_cache", "activations", "logits_chunk"]
    lines.append(f"{'GiB':<22}{'rollout':>10}{'train':>10}")
    for name in names:
        values = [plan_.breakdown[p].get(name) for p in ("rollout", "train")]
        cells = "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in values)
        lines.append(f"{name:<22}{cells}")
    lines.append(f"{'peak':<22}{plan_.rollout_peak_gib:>10.2f}{plan_.train_peak_gib:>10.2f}")
    if plan_.gpu_gib is not None:
        verdict = "fits" if plan_.fits else "does NOT fit"
        lines.append(f"{verdict} a {plan_.gpu_gib:g} GiB GPU (peak {plan_.peak_gib:.2f} GiB + {GPU_OVERHEAD_GIB:g} "
                     "GiB for the CUDA context and allocator)")  # fmt: skip
    if plan_.max_n is not None:
        lines.append(f"largest rollout.n that fits: {plan_.max_n}")
    if plan_.max_context is not None:
        lines.append(f"longest sequence that fits: {plan_.max_context} tokens")
    lines.extend(f"note: {n}" for n in plan_.notes)
    return lines


def advice(plan_: MemoryPlan, config: TrainConfig) -> str:
    """What to change when a plan does not fit, from what dominates it."""
    phase = "train" if plan_.train_peak_gib >= plan_.rollout_peak_gib else "rollout"
    parts = plan_.breakdown[phase]
    top = max(parts, key=lambda k: parts[k] if k != "logits_chunk" else -1)
    m = config.model
    tips = {
        "weights": "a larger GPU, or more GPUs (parallel.dp_shard)",
        "kv_cache": f"fewer sequences at once (rollout.n={config.rollout.n}, rollout.prompts_per_step="
                    f"{config.rollout.prompts_per_step}, rollout.max_num_seqs={config.rollout.max_num_seqs}) or "
                    f"shorter ones (rollout.max_new_tokens={config.rollout.max_new_tokens}); or set "
                    "rollout.kv_cache_tokens",
        "adapters_optimizer": f"a smaller LoRA (lora.r={config.lora.r}, fewer lora.targets)",
    }  # fmt: skip
    act = [f"a smaller optim.micro_batch_tokens (now {config.optim.micro_batch_tokens})"]
    if not m.gradient_checkpointing:
        act.append("model.gradient_checkpointing=true")
    if not m.offload_activations:
        act.append("model.offload_activations=true")
    if m.moe_chunk_tokens is None:
        act.append("model.moe_chunk_tokens=8192")
    if not m.offload_embeddings and config.lora.enabled:
        act.append("model.offload_embeddings=true")
    tip = tips.get(top, ", ".join(act))
    return f"the {phase} step peaks at {plan_.peak_gib:.1f} GiB, mostly {top}; try {tip}"


def budget_gib(device: torch.device | None = None) -> float:
    """The GPU's total memory in GiB (``torch.cuda.mem_get_info``)."""
    _, total = torch.cuda.mem_get_info(device)
    return total / GIB
