"""Building the policy's starting point: the model (a checkpoint, or the tiny demo model) and, for tasks that supply
demonstrations, a short supervised warm start whose result is cached on disk (keyed by everything that shapes it)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ossrl.config import TrainConfig
from ossrl.harmony import load_harmony_tokenizer
from ossrl.model import GptOss, GptOssConfig
from ossrl.model.checkpoint import resolve_checkpoint_dir
from ossrl.model.tiny import TINY_VERSION, write_tiny_checkpoint
from ossrl.rollout.batch import RolloutBatch
from ossrl.train.batching import pack_micro_batches, pack_sequences
from ossrl.train.logprobs import packed_logprobs

log = logging.getLogger(__name__)
# Bump when supervised_warm_start changes how it trains: cached warm starts are keyed by it.
WARM_START_VERSION = 2


def _key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_checkpoint(config: TrainConfig) -> Path:
    """The checkpoint directory the run starts from; "tiny" writes (once) a seeded tiny model into the cache."""
    if config.model.path != "tiny":
        return resolve_checkpoint_dir(config.model.path)
    cache = Path(config.warmup.cache_dir).expanduser() / f"tiny-{_key({'seed': config.seed, 'version': TINY_VERSION})}"
    if not (cache / "config.json").exists():
        write_tiny_checkpoint(cache, seed=config.seed)
    return cache


def check_against_model(config: TrainConfig, model: GptOssConfig) -> None:
    """What the run's settings must respect of the model, checked from its config.json before any weight loads:
    the LoRA rank below the smallest side of every adapted matrix, and a rollout that fits the context."""
    h, i, d = model.hidden_size, model.intermediate_size, model.head_dim
    sides = {"q_proj": (h, model.num_attention_heads * d), "k_proj": (h, model.num_key_value_heads * d),
             "v_proj": (h, model.num_key_value_heads * d), "o_proj": (model.num_attention_heads * d, h),
             "gate_up_proj": (h, 2 * i), "down_proj": (i, h), "router": (h, model.num_local_experts)}  # fmt: skip
    if config.lora.enabled:
        limit = min(min(sides[t]) for t in config.lora.targets)
        if config.lora.r > limit:
            raise ValueError(f"lora.r={config.lora.r} is larger than the smallest adapted matrix side ({limit}) of "
                             f"{config.model.path}; a rank above it adds parameters and nothing else")  # fmt: skip
    if config.rollout.max_new_tokens >= model.max_position_embeddings:
        raise ValueError(f"rollout.max_new_tokens={config.rollout.max_new_tokens} does not fit the model's context "
                         f"({model.max_position_embeddings} tokens)")  # fmt: skip


def sampled_logprobs(model: GptOss, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the tokens a demonstration's loss mask selects (one packed forward)."""
    return packed_logprobs(model, batch.tokens, batch.cu_seqlens, batch.loss_mask)


def supervised_warm_start(model: GptOss, tokenizer: Any, task: Any, config: TrainConfig) -> dict[str, float]:
    """Full-parameter SFT on ``task.demonstrations``: cross-entropy on the tokens the policy writes (tool results
    excluded). The first ``warmup.tool_first_steps`` steps draw from tool-using demonstrations only, the rest from
    demonstrations that use the tool in a ``warmup.tool_fraction`` share. Returns the final loss and the wall time."""
    settings = config.warmup

    def rendered(tool_fraction: float, seed: int) -> RolloutBatch:
        demos = [task.render_demonstration(d, tokenizer)
                 for d in task.demonstrations(settings.examples, tool_fraction=tool_fraction, seed=seed)]  # fmt: skip
        return pack_sequences([d["prompt_ids"] for d in demos], [d["completion_ids"] for d in demos],
                              [d["loss_mask"] for d in demos], device=model.device)  # fmt: skip

    mixed = rendered(settings.tool_fraction, config.seed)
    tool_only = rendered(1.0, config.seed + 1) if settings.tool_first_steps else mixed
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / settings.steps))
    generator = torch.Generator().manual_seed(config.seed)
    start, loss_value = time.perf_counter(), float("nan")
    report_every = max(1, min(25, settings.steps // 10))
    model.train()
    for step in range(settings.steps):
        demos = tool_only if step < settings.tool_first_steps else mixed
        chosen = demos.select(torch.randint(0, demos.num_seqs, (settings.batch_size,), generator=generator))
        tokens = int(chosen.loss_mask.sum())
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in pack_micro_batches(chosen.seq_lens.tolist(), config.optim.micro_batch_tokens):
            mb = chosen.select(micro)
            lp, _ = sampled_logprobs(model, mb)
            loss = -lp.sum() / tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        loss_value = total
        if (step + 1) % report_every == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - start
            left = elapsed / (step + 1) * (settings.steps - step - 1)
            log.info("warm start %d/%d: loss %.4f, %.0f s so far, about %.0f s left", step + 1, settings.steps,
                     loss_value, elapsed, left)  # fmt: skip
    model.eval()
    return {"warmup/loss": loss_value, "warmup/seconds": time.perf_counter() - start}


def load_starting_point(config: TrainConfig, task: Any, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, info): the base checkpoint, after the cached supervised warm start when one is asked for."""
    log.info("loading %s (%s, %s)", config.model.path, str(dtype).removeprefix("torch."), device)
    base = base_checkpoint(config)
    check_against_model(config, GptOssConfig.from_json(base / "config.json"))
    tokenizer = load_harmony_tokenizer(base)
    info: dict[str, Any] = {"base_checkpoint": str(base)}
    if config.warmup.steps <= 0:
        return GptOss.from_pretrained(base, dtype=dtype, device=device), tokenizer, info
    if not hasattr(task, "demonstrations"):
        raise ValueError(f"warmup.steps > 0 but task {task.name!r} has no demonstrations; set warmup.steps=0")
    key = _key({"version": WARM_START_VERSION, "base": str(base), "warmup": vars(config.warmup),
                "task": config.task.name, "options": config.task.options, "seed": config.seed,
                "dtype": str(dtype)})  # fmt: skip
    cached = Path(config.warmup.cache_dir).expanduser() / f"warm-{key}"
    info["warm_start"] = str(cached)
    if (cached / "config.json").exists():
        log.info("warm start: reusing %s", cached)
        info.update(json.loads((cached / "warm_start.json").read_text()))
        return GptOss.from_pretrained(cached, dtype=dtype, device=device), tokenizer, info
    log.info("warm start: %d supervised steps on %s demonstrations, once (a few minutes on a 2-core CPU for the tiny "
             "recipe); later runs with the same settings reuse %s", config.warmup.steps, task.name, cached)
    torch.manual_seed(config.seed)
    model = GptOss.from_pretrained(base, dtype=dtype, device=device)
    stats = supervised_warm_start(model, tokenizer, task, config)
    model.save_pretrained(cached)
    tokenizer.save_pretrained(cached)
    (cached / "warm_start.json").write_text(json.dumps(stats))
    info.update(stats)
    return model, tokenizer, info
