"""The GRPO-family training loop: rollout with the engine (a ``RolloutBatch`` of packed tensors) -> rewards ->
advantages -> micro-batches of whole sequences -> loss, backward with gradient accumulation (``train.update``) ->
clip -> AdamW step -> the engine's weight-sync boundary. Read top to bottom; the algorithms are the pure tensor
functions of ``ossrl.rl``. One engine serves the whole run: its KV cache is handed back during each update."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ossrl import rl
from ossrl.config import TrainConfig
from ossrl.determinism import deterministic
from ossrl.model.lora import LoraConfig, apply_lora, lora_parameters
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.rollout.batch import ERROR, FINISH_REASONS, RolloutBatch
from ossrl.sandbox.runner import ALLOW_ENV as SANDBOX_ALLOW_ENV
from ossrl.tasks import get_task
from ossrl.tasks.rewards import RewardOutput
from ossrl.train.batching import pack_micro_batches, pack_sequences
from ossrl.train.evaluate import accuracy_reward, evaluate
from ossrl.train.state import load_training_state, save_training_state
from ossrl.train.update import MetricReducer, MicroBatch, fill_old_logprobs, micro_batch_loss, normalizer
from ossrl.train.warm_start import load_starting_point

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAMPLES_PER_STEP = 4  # sequences of each step written to RUN_DIR/samples.jsonl
log = logging.getLogger(__name__)


class RewardFailure(RuntimeError):
    """A reward function failed on every sample of a step."""


class NonFiniteParameters(RuntimeError):
    """An optimizer step produced a NaN or infinite parameter."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = _device(config.model.device)
        if config.allow_unisolated_sandbox:  # the tasks' sandboxed tools and graders read the opt-in from here
            os.environ[SANDBOX_ALLOW_ENV] = "1"
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        options = {"reasoning_effort": config.task.reasoning_effort, "seed": config.seed, **config.task.options}
        self.task = get_task(config.task.name, **options)
        self.model, self.tokenizer, self.start_info = load_starting_point(
            config, self.task, self.device, DTYPES[config.model.dtype]
        )
        self.model.gradient_checkpointing = config.model.gradient_checkpointing
        if config.lora.enabled:
            lora = LoraConfig(r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                              targets=tuple(config.lora.targets))  # fmt: skip
            apply_lora(self.model, lora, generator=torch.Generator(device=self.device).manual_seed(config.seed))
            self.params = lora_parameters(self.model)
        else:
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        opt = config.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.engine = Engine(self.model, self.tokenizer, max_num_seqs=config.rollout.max_num_seqs,
                             kv_cache_tokens=config.rollout.kv_cache_tokens,
                             cuda_graphs=config.rollout.cuda_graphs,
                             torch_compile=config.rollout.torch_compile)  # fmt: skip
        self.rows = self.task.rows("train")
        self.order: list[int] = []
        self._order_epoch = -1
        self.position = 0  # prompts consumed so far (the data position a resume restores)
        self.step = 0
        self.samples: list[dict] = []  # a few of the last step's sequences, as text

    # ---- schedule and data -------------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        opt, total = self.config.optim, max(1, self.config.steps)
        if step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        progress = (step - opt.warmup_steps) / max(1, total - opt.warmup_steps)
        if opt.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if opt.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    def next_rows(self, count: int) -> list[dict[str, Any]]:
        """The next prompts in a seeded order, reshuffled every epoch (a pure function of the position)."""
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.rows))
            if epoch != self._order_epoch:
                self.order = list(range(len(self.rows)))
                random.Random(self.config.seed * 7919 + epoch).shuffle(self.order)
                self._order_epoch = epoch
            out.append(self.rows[self.order[index]])
            self.position += 1
        return out

    def sampling(self, seed: int, *, eval_mode: bool = False) -> SamplingParams:
        r = self.config.rollout
        if eval_mode:
            max_new = self.config.task.eval_max_new_tokens or r.max_new_tokens
            return SamplingParams(temperature=0.0, max_new_tokens=max_new, max_turns=r.max_turns,
                                  tool_timeout_s=r.tool_timeout_s, max_tool_tokens=r.max_tool_tokens)  # fmt: skip
        return SamplingParams(
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p, max_new_tokens=r.max_new_tokens,
            seed=seed, max_turns=r.max_turns, tool_timeout_s=r.tool_timeout_s, max_tool_tokens=r.max_tool_tokens,
        )  # fmt: skip

    # ---- one step ----------------------------------------------------------------------------------------------
    def rollout(self) -> tuple[RolloutBatch, torch.Tensor, dict[str, list], dict[str, float]]:
        """Prompts x n samples, scored: (batch, total rewards [N], each reward's values, metrics). Requests the
        engine refused (finish "error") are dropped and counted. With dynamic sampling, groups whose rewards are all
        equal are replaced by fresh prompts."""
        r, algo = self.config.rollout, self.config.algorithm
        parts: list[RolloutBatch] = []
        rewards: list[torch.Tensor] = []
        values: dict[str, list] = {}
        reward_errors: dict[str, int] = {}
        self.samples = []
        kept = attempts = errors = sampled = 0
        start = time.perf_counter()
        while kept < r.prompts_per_step and attempts <= (algo.max_refills if algo.dynamic_sampling else 0):
            batch_rows = self.next_rows(r.prompts_per_step - kept)
            seed = self.config.seed * 1_000_003 + self.step * 101 + attempts
            requests = [Request(self.task.render_prompt(row, self.tokenizer), n=r.n) for row in batch_rows]
            batch = self.engine.rollout(requests, self.sampling(seed), tools=self.task.tool_functions or None)
            attempts += 1
            ok = (batch.finish != ERROR).nonzero().squeeze(1).cpu()
            errors += batch.num_seqs - ok.numel()
            batch = batch.select(ok)
            if batch.num_seqs == 0:
                continue
            sampled += int(batch.sampled_lens.sum())
            seq_rows = [batch_rows[g] for g in batch.group.tolist()]
            completion_ids = batch.completion_ids()
            scored = self.task.score(seq_rows, completion_ids, tokenizer=self.tokenizer)
            self._check_rewards(scored, reward_errors)
            if not self.samples:
                self.samples = self._samples(batch, completion_ids, scored.total)
            total = torch.tensor(scored.total, dtype=torch.float32)
            if algo.overlong_buffer > 0:
                total = total + rl.overlong_penalty(batch.sampled_lens.cpu(), r.max_new_tokens, algo.overlong_buffer,
                                                    penalty=algo.overlong_penalty)  # fmt: skip
            keep = torch.ones(batch.num_seqs, dtype=torch.bool)
            if algo.dynamic_sampling:
                keep = rl.filter_groups(total, batch.group.cpu())
            index = keep.nonzero().squeeze(1)
            parts.append(batch.select(index))
            rewards.append(total[index])
            for name, vals in scored.values.items():
                values.setdefault(name, []).extend(vals[i] for i in index.tolist())
            kept += int(batch.group[keep.to(batch.device)].unique().numel())
        seconds = time.perf_counter() - start
        metrics = {"rollout_tokens_per_s": sampled / max(seconds, 1e-9), "rollout_seconds": seconds,
                   "groups_kept": float(kept), "rollout_errors": float(errors),
                   **{f"reward/{name}/errors": float(n) for name, n in reward_errors.items()}}  # fmt: skip
        if not parts:
            return pack_sequences([], [], device=self.device), torch.zeros(0), {}, metrics
        return RolloutBatch.cat(parts), torch.cat(rewards), values, metrics

    def _kernels(self):
        """The kernels' mode for this run's model work: ``deterministic: true`` runs rollouts, evaluations and
        updates inside ``ossrl.deterministic()`` (set around each call, so nothing else in the process changes)."""
        return deterministic() if self.config.deterministic else nullcontext()

    def train_step(self) -> dict[str, float]:
        with self._kernels():
            metrics = self._train_step()
        gap = metrics.get("mismatch/max_abs_diff", 0.0)
        if self.config.deterministic and gap != 0 and not getattr(self, "_warned_mismatch", False):
            self._warned_mismatch = True  # once per run
            log.warning("deterministic mode: the trainer's log-probs differ from the sampler's "
                        "(mismatch/max_abs_diff = %.3g at step %d; expected 0): something in the run is not "
                        "batch-invariant (LoRA dropout changes the training forward; a model or kernel outside "
                        "ossrl's)", gap, self.step + 1)  # fmt: skip
        return metrics

    def _train_step(self) -> dict[str, float]:
        cfg, algo = self.config, self.config.algorithm
        batch, rewards, reward_values, metrics = self.rollout()
        self.engine.release_memory()  # the KV cache's memory is the update's until the next rollout
        metrics.update(self._reward_metrics(batch, rewards, reward_values))
        if batch.num_seqs == 0 or not bool(batch.loss_mask.any()):
            return {**metrics, "skipped": 1.0}
        advantages = rl.compute_advantages(algo.advantage, rewards, batch.group.cpu(), scale=algo.scale)
        start = time.perf_counter()
        micro = [
            MicroBatch(batch.select(index), advantages[index])
            for index in pack_micro_batches(batch.seq_lens.tolist(), cfg.optim.micro_batch_tokens)
        ]
        norm = normalizer(batch, algo.agg)
        temperature, max_len = cfg.rollout.temperature, cfg.rollout.max_new_tokens
        if algo.updates_per_batch > 1:
            self.model.eval()
            fill_old_logprobs(self.model, micro, temperature, replay=algo.router_replay)
        self.model.train()
        for update in range(algo.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            reducer = MetricReducer(algo.loss)
            for mb in micro:
                parts = micro_batch_loss(self.model, mb, algo, temperature=temperature, max_len=max_len, norm=norm,
                                         first=update == 0)  # fmt: skip
                for name, (value, counts) in parts.items():
                    reducer.add(name, value, counts)
            if update == 0:
                first = {k: v for k, v in reducer.result().items() if k.startswith(("mismatch/", "router/"))}
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            if not torch.isfinite(grad_norm) or not math.isfinite(reducer.result().get("loss", 0.0)):
                self.optimizer.zero_grad(set_to_none=True)
                metrics["skipped"] = 1.0  # non-finite loss or gradient: no update, the run goes on
                break
            self.optimizer.step()
            self._check_parameters()
        self.scheduler.step()
        self.model.eval()
        self.engine.update_weights()  # the engine runs this very model: the boundary, with nothing to copy
        metrics.update(reducer.result())
        metrics.update(first)
        train_seconds = max(time.perf_counter() - start, 1e-9)
        metrics.update(grad_norm=float(grad_norm), lr=self.scheduler.get_last_lr()[0],
                       train_tokens_per_s=int(batch.seq_lens.sum()) / train_seconds)  # fmt: skip
        metrics.setdefault("skipped", 0.0)
        if torch.cuda.is_available():
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    def _check_parameters(self) -> None:
        """Stop the run when an update left a non-finite parameter: every later step would be garbage, and the
        last good checkpoint must stay the last one."""
        if not bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all()):
            raise NonFiniteParameters(
                f"an update at step {self.step + 1} left non-finite parameters (lr {self.scheduler.get_last_lr()[0]:g}"
                f", max_grad_norm {self.config.optim.max_grad_norm:g}); stopping the run, the last checkpoint is kept"
            )

    def _check_rewards(self, scored: RewardOutput, counts: dict[str, int]) -> None:
        """Count each reward's failures; a reward that failed on every sample stops the run (a broken reward
        function would otherwise train on zeros)."""
        for name, failed in scored.errors.items():
            counts[name] = counts.get(name, 0) + failed
            if failed and failed == len(scored.total):
                raise RewardFailure(
                    f"reward {name!r} failed on all {failed} samples of step {self.step + 1} "
                    f"({scored.error_messages.get(name, 'no message')}); stopping the run: fix the reward function "
                    "(checkpoints written so far are kept)"
                )

    def _samples(self, batch: RolloutBatch, completion_ids: list[list[int]], rewards: list[float]) -> list[dict]:
        """A few sequences of the step, as text, for ``samples.jsonl``."""
        out = []
        prompts, finish = batch.prompt_ids(), batch.finish_reasons
        for i in range(min(SAMPLES_PER_STEP, batch.num_seqs)):
            out.append({"step": self.step + 1, "group": int(batch.group[i]), "reward": rewards[i],
                        "finish": finish[i], "prompt": self.tokenizer.decode(prompts[i]),
                        "completion": self.tokenizer.decode(completion_ids[i])})  # fmt: skip
        return out

    @property
    def base_model_name(self) -> str:
        """What the adapters are trained on: the warm-started checkpoint, the built tiny one, or model.path."""
        if "warm_start" in self.start_info:
            return self.start_info["warm_start"]
        return self.start_info["base_checkpoint"] if self.config.model.path == "tiny" else self.config.model.path

    def _reward_metrics(self, batch: RolloutBatch, rewards: torch.Tensor, values: dict[str, list]) -> dict[str, float]:
        if batch.num_seqs == 0:
            return {"reward/mean": 0.0}
        out = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0}
        for name, vals in values.items():
            applied = [v for v in vals if v is not None]
            if applied:
                out[f"reward/{name}"] = sum(applied) / len(applied)
        accuracy = out.get(f"reward/{accuracy_reward(self.task, values)}")
        if accuracy is not None:
            out["accuracy"] = accuracy
        out["response_length"] = batch.sampled_lens.float().mean().item()
        out["tool_calls_per_episode"] = batch.num_tool_calls.float().mean().item()
        out["finish_length_frac"] = (batch.finish == FINISH_REASONS.index("length")).float().mean().item()
        return out

    # ---- evaluation and checkpoints ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        split = "eval" if "eval" in self.task.splits else "test"
        with self._kernels():
            return evaluate(self.model, self.tokenizer, self.task, split=split, limit=self.config.task.eval_limit,
                            sampling=self.sampling(0, eval_mode=True), engine=self.engine)  # fmt: skip

    def save(self, directory: Path, run_id: str | None = None) -> None:
        save_training_state(self, directory, run_id)

    def resume_from(self, directory: Path) -> None:
        load_training_state(self, directory)
