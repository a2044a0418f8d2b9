"""The GRPO-family training loop: rollout with the engine -> rewards -> advantages -> packed micro-batches ->
loss, backward with gradient accumulation -> clip -> AdamW step. Read top to bottom; the algorithms are the pure
tensor functions of ``ossrl.rl``."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from ossrl import rl
from ossrl.config import TrainConfig
from ossrl.model.lora import LoraConfig, apply_lora, disabled_lora, lora_parameters
from ossrl.rollout import Completion, Engine, Request, SamplingParams
from ossrl.tasks import get_task
from ossrl.train.batching import Episode, episode_logprobs, pack_micro_batches, padded
from ossrl.train.evaluate import evaluate
from ossrl.train.state import load_training_state, save_training_state
from ossrl.train.warm_start import load_starting_point

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = _device(config.model.device)
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
    def rollout(self) -> tuple[list[dict], list[Completion], list[float], dict[str, list], dict[str, float]]:
        """Prompts x n samples, scored: (rows, completions, total rewards, each reward's values, metrics). With
        dynamic sampling, groups whose rewards are all equal are replaced by fresh prompts."""
        r, algo = self.config.rollout, self.config.algorithm
        rows, completions, rewards, values = [], [], [], {}
        sampled = attempts = 0
        start = time.perf_counter()
        while len(rows) < r.prompts_per_step * r.n and attempts <= (algo.max_refills if algo.dynamic_sampling else 0):
            want = r.prompts_per_step - len(rows) // r.n
            batch_rows = self.next_rows(want)
            seed = self.config.seed * 1_000_003 + self.step * 101 + attempts
            requests = [Request(self.task.render_prompt(row, self.tokenizer), n=r.n) for row in batch_rows]
            groups = self.engine.generate(requests, self.sampling(seed), tools=self.task.tool_functions or None)
            flat_rows = [row for row in batch_rows for _ in range(r.n)]
            flat = [c for g in groups for c in g]
            scored = self.task.score(flat_rows, flat, tokenizer=self.tokenizer)
            sampled += sum(sum(c.loss_mask) for c in flat)
            total = torch.tensor(scored.total)
            if algo.overlong_buffer > 0:
                lengths = torch.tensor([sum(c.loss_mask) for c in flat])
                total = total + rl.overlong_penalty(lengths, r.max_new_tokens, algo.overlong_buffer,
                                                    penalty=algo.overlong_penalty)  # fmt: skip
            keep = torch.ones(len(batch_rows), dtype=torch.bool)
            if algo.dynamic_sampling:
                keep = rl.filter_groups(total.view(len(batch_rows), r.n))
            for g in keep.nonzero().squeeze(1).tolist():
                rows.extend(flat_rows[g * r.n : (g + 1) * r.n])
                completions.extend(flat[g * r.n : (g + 1) * r.n])
                rewards.extend(total[g * r.n : (g + 1) * r.n].tolist())
                for name, vals in scored.values.items():
                    values.setdefault(name, []).extend(vals[g * r.n : (g + 1) * r.n])
            attempts += 1
        seconds = time.perf_counter() - start
        metrics = {"rollout_tokens_per_s": sampled / max(seconds, 1e-9), "rollout_seconds": seconds,
                   "groups_kept": len(rows) // r.n}  # fmt: skip
        return rows, completions, rewards, values, metrics

    def train_step(self) -> dict[str, float]:
        cfg, algo = self.config, self.config.algorithm
        rows, completions, reward_list, reward_values, metrics = self.rollout()
        rewards = torch.tensor(reward_list, dtype=torch.float32)
        metrics.update(self._reward_metrics(rewards, reward_values, completions))
        if not completions:
            return {**metrics, "skipped": 1.0}
        group_ids = torch.arange(len(completions)) // cfg.rollout.n
        advantages = rl.compute_advantages(algo.advantage, rewards, group_ids, scale=algo.scale).tolist()
        prompts = [self.task.render_prompt(row, self.tokenizer) for row in rows]
        episodes = [
            Episode(p, c.token_ids, c.loss_mask, c.logprobs, a, g)
            for p, c, a, g in zip(prompts, completions, advantages, group_ids.tolist(), strict=True)
            if c.token_ids and c.finish_reason != "error"
        ]
        if not episodes:
            return {**metrics, "skipped": 1.0}
        start = time.perf_counter()
        micro = pack_micro_batches(episodes, cfg.optim.micro_batch_tokens)
        normalizer = self._normalizer(episodes)
        old = self._old_logprobs(episodes, micro) if algo.updates_per_batch > 1 else None
        self.model.train()
        for _ in range(algo.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for mb in micro:
                parts = self._micro_batch_loss([episodes[i] for i in mb], normalizer, None if old is None else
                                               [old[i] for i in mb])  # fmt: skip
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            if not torch.isfinite(grad_norm) or not math.isfinite(sums.get("loss", 0.0)):
                self.optimizer.zero_grad(set_to_none=True)
                metrics["skipped"] = 1.0  # non-finite loss or gradient: no update, the run goes on
                break
            self.optimizer.step()
        self.scheduler.step()
        self.model.eval()
        train_tokens = sum(len(e.prompt) + len(e.completion) for e in episodes)
        metrics.update({k: v for k, v in sums.items()})
        metrics.update(grad_norm=float(grad_norm), lr=self.scheduler.get_last_lr()[0],
                       train_tokens_per_s=train_tokens / max(time.perf_counter() - start, 1e-9))  # fmt: skip
        metrics.setdefault("skipped", 0.0)
        if torch.cuda.is_available():
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    def _normalizer(self, episodes: list[Episode]) -> float:
        agg = self.config.algorithm.agg
        if agg == "token-mean":
            return float(sum(sum(e.loss_mask) for e in episodes))
        if agg == "seq-mean-token-mean":
            return float(sum(1 for e in episodes if any(e.loss_mask)))
        return float(len(episodes))

    @torch.no_grad()
    def _old_logprobs(self, episodes: list[Episode], micro: list[list[int]]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [torch.empty(0)] * len(episodes)
        for mb in micro:
            lp, _ = episode_logprobs(self.model, [episodes[i] for i in mb], self.config.rollout.temperature)
            for row, i in enumerate(mb):
                out[i] = lp[row, : len(episodes[i].completion)]
        return out

    def _micro_batch_loss(self, eps: list[Episode], normalizer: float, old: list[torch.Tensor] | None) -> dict:
        """Forward + backward of one micro-batch; the loss is already divided by the whole batch's normalizer, so
        accumulated gradients equal the full batch's. Returns the metrics' contributions (sums over the batch)."""
        algo, device, temp = self.config.algorithm, self.model.device, self.config.rollout.temperature
        lp, entropy = episode_logprobs(self.model, eps, temp)
        width = lp.shape[1]
        mask = padded([e.loss_mask for e in eps], width, torch.float32, device)
        sampler = padded([e.sampler_logprobs for e in eps], width, torch.float32, device)
        adv = torch.tensor([e.advantage for e in eps], dtype=torch.float32, device=device)
        old_lp = (
            lp.detach() if old is None else torch.stack([torch.nn.functional.pad(o, (0, width - len(o))) for o in old])
        )
        mismatch = rl.mismatch_metrics(lp.detach(), sampler, mask)
        is_weights = None if algo.tis_cap is None else rl.truncated_is_weights(lp.detach(), sampler, mask,
                                                                                cap=algo.tis_cap)  # fmt: skip
        if algo.seq_mask_hi is not None:
            keep, _ = rl.sequence_is_mask(lp.detach(), sampler, mask, hi=algo.seq_mask_hi)
            mask = mask * keep[:, None]
        max_len = max(self.config.rollout.max_new_tokens, width)
        loss_fn = rl.get_policy_loss(algo.loss)
        eps_kwargs = {"eps_low": algo.eps_low, "eps_high": algo.eps_high} if algo.loss == "ppo" else {}
        loss, m = loss_fn(lp, old_lp, adv, mask, agg=algo.agg, max_len=max_len, normalizer=normalizer,
                          is_weights=is_weights, **eps_kwargs)  # fmt: skip
        out = {"policy_loss": loss.item()}
        if algo.kl_coef > 0:
            with torch.no_grad(), disabled_lora(self.model):
                ref_lp, _ = episode_logprobs(self.model, eps, temp)
            kl = rl.kl_loss(lp, ref_lp, mask, kind=algo.kl_kind, agg=algo.agg, max_len=max_len, normalizer=normalizer)
            loss = loss + algo.kl_coef * kl
            out["kl"] = kl.item()
        if algo.entropy_coef > 0:
            loss = loss + rl.entropy_bonus(entropy, mask, algo.entropy_coef, agg=algo.agg, max_len=max_len,
                                           normalizer=normalizer)  # fmt: skip
        loss.backward()
        share = (
            len(eps) / max(1.0, normalizer) if algo.agg != "token-mean" else float(mask.sum()) / max(1.0, normalizer)
        )
        out["loss"] = loss.item()
        out["entropy"] = float(rl.masked_mean(entropy.detach(), mask)) * share
        for key in ("clip_frac_low", "clip_frac_high"):
            if key in m:
                out[key] = float(m[key]) * share
        for key, value in mismatch.items():
            out[f"mismatch/{key}"] = float(value) * share if key != "max_abs_diff" else float(value)
        return out

    def _reward_metrics(
        self, rewards: torch.Tensor, values: dict[str, list], completions: list[Completion]
    ) -> dict[str, float]:
        if not completions:
            return {"reward/mean": 0.0}
        out = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0}
        for name, vals in values.items():
            applied = [v for v in vals if v is not None]
            if applied:
                out[f"reward/{name}"] = sum(applied) / len(applied)
        accuracy = out.get(f"reward/{self.task.accuracy_reward}")
        if accuracy is not None:
            out["accuracy"] = accuracy
        out["response_length"] = sum(sum(c.loss_mask) for c in completions) / len(completions)
        out["tool_calls_per_episode"] = sum(c.num_tool_calls for c in completions) / len(completions)
        out["finish_length_frac"] = sum(c.finish_reason == "length" for c in completions) / len(completions)
        return out

    # ---- evaluation and checkpoints ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        split = "eval" if "eval" in self.task.splits else "test"
        return evaluate(self.model, self.tokenizer, self.task, split=split, limit=self.config.task.eval_limit,
                        sampling=self.sampling(0, eval_mode=True), engine=self.engine)  # fmt: skip

    def save(self, directory: Path) -> None:
        save_training_state(self, directory)

    def resume_from(self, directory: Path) -> None:
        load_training_state(self, directory)
