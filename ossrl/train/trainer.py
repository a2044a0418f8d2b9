"""The GRPO-family training loop: rollout with the engine (a ``RolloutBatch`` of packed tensors) -> rewards ->
advantages -> micro-batches of whole sequences -> loss, backward with gradient accumulation (``train.update``) ->
clip -> AdamW step -> the engine's weight-sync boundary. Read top to bottom; the algorithms are the pure tensor
functions of ``ossrl.rl``. One engine serves the whole run: its KV cache is handed back during each update.

Under torchrun (``dist`` given) the same loop runs on every rank, and N ranks compute what one process would:
each data-parallel rank samples a contiguous share of the step's prompts with their global request ids (the same
random streams), every rank advances the data position by the whole step, advantages are computed on the rewards
of all ranks (so groups and batch statistics are the global ones), every loss is divided by the global token (or
sequence) count and FSDP2 sums the gradients, and the metrics are combined by their declared reductions. The
trainer's ``model`` is FSDP2-sharded; the engine runs its own plain model (``engine.model``), refreshed through
``ossrl.dist.sync.sync_weights`` after each update."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ossrl import rl
from ossrl.config import TrainConfig
from ossrl.determinism import deterministic
from ossrl.dist.launch import DistContext, rank0_first
from ossrl.model.lora import LoraConfig, apply_lora, disabled_lora, lora_parameters
from ossrl.model.offload import apply_memory_options
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


@dataclass
class _BatchStats:
    """The per-sequence fields ``_reward_metrics`` reads, gathered from every rank."""

    num_seqs: int
    sampled_lens: torch.Tensor
    num_tool_calls: torch.Tensor
    finish: torch.Tensor


def _group_rank(group) -> int:
    import torch.distributed as tdist

    return tdist.get_rank(group)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, config: TrainConfig, dist: DistContext | None = None) -> None:
        self.config = config
        self.dist = dist  # None: one process, no torch.distributed anywhere
        if dist is not None and config.model.offload_embeddings:
            raise ValueError("model.offload_embeddings is not supported under torchrun yet (a CPU table inside an "
                             "FSDP2-wrapped model is untested); turn it off for multi-process runs")  # fmt: skip
        self.device = dist.device if dist is not None else _device(config.model.device)
        if config.allow_unisolated_sandbox:  # the tasks' sandboxed tools and graders read the opt-in from here
            os.environ[SANDBOX_ALLOW_ENV] = "1"
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        options = {"reasoning_effort": config.task.reasoning_effort, "seed": config.seed, **config.task.options}
        self.task = get_task(config.task.name, **options)
        with rank0_first(dist):  # rank 0 writes the tiny checkpoint / warm start to the cache, the others read it
            self.model, self.tokenizer, self.start_info = load_starting_point(
                config, self.task, self.device, DTYPES[config.model.dtype]
            )
        self.model.gradient_checkpointing = config.model.gradient_checkpointing
        apply_memory_options(self.model, config.model)  # activation / embedding offload, chunked MoE
        if config.lora.enabled:
            lora = LoraConfig(r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                              targets=tuple(config.lora.targets))  # fmt: skip
            apply_lora(self.model, lora, generator=torch.Generator(device=self.device).manual_seed(config.seed))
            self.params = lora_parameters(self.model)
        else:
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        engine_model = self.model  # one process: the engine runs the trainer's very model
        self.mesh, self.dp_group, self.dp_rank, self.dp_size, self.sp_group = None, None, 0, 1, None
        if dist is not None:
            engine_model = self._distribute()
        opt = config.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.engine = Engine(engine_model, self.tokenizer, max_num_seqs=config.rollout.max_num_seqs,
                             kv_cache_tokens=config.rollout.kv_cache_tokens,
                             cuda_graphs=config.rollout.cuda_graphs,
                             torch_compile=config.rollout.torch_compile)  # fmt: skip
        if dist is not None:  # the engine's trained weights from the (sharded) trainer's: the weight-sync boundary
            from ossrl.dist.sync import sync_weights

            sync_weights(self.model, self.engine, lora=config.lora.enabled)
        self.rows = self.task.rows("train")
        self.order: list[int] = []
        self._order_epoch = -1
        self.position = 0  # prompts consumed so far (the data position a resume restores)
        self.step = 0
        self.samples: list[dict] = []  # a few of the last step's sequences, as text

    def _distribute(self):
        """Mesh, the engine's own model, FSDP2 (and Ulysses SP); returns the engine's model. Runs on every rank."""
        from ossrl.dist.fsdp import apply_fsdp
        from ossrl.dist.mesh import build_mesh, check_heads, dp_group, dp_mesh, mesh_shape
        from ossrl.dist.sync import engine_model, materialize

        par, lora = self.config.parallel, self.config.lora.enabled
        sizes = mesh_shape(par, self.dist.world_size)
        check_heads(sizes["sp"], self.model.config)
        self.mesh = build_mesh(par, self.device.type)
        self.dp_group = dp_group(self.mesh)
        self.dp_size = sizes["dp_replicate"] * sizes["dp_shard"]
        replica, shard = self.mesh["dp_replicate"].get_local_rank(), self.mesh["dp_shard"].get_local_rank()
        self.dp_rank = replica * sizes["dp_shard"] + shard
        plain = engine_model(self.model, lora=lora)
        if sizes["sp"] > 1:
            from ossrl.dist.ulysses import apply_ulysses

            self.sp_group = self.mesh["sp"].get_group()
            apply_ulysses(self.model, self.sp_group)
        apply_fsdp(self.model, dp_mesh(self.mesh), lora=lora)
        materialize(plain, self.device)  # full fine-tuning: the engine's weights, now that the trainer's are sharded
        # fully_shard replaced the parameters by DTensor shards: the optimizer gets those
        self.params = lora_parameters(self.model) if lora else [p for p in self.model.parameters() if p.requires_grad]
        return plain

    # ---- data-parallel reductions (identity in one process) ----------------------------------------------------
    def _all_sum(self, value: float, op: str = "sum") -> float:
        if self.dist is None:
            return value
        import torch.distributed as tdist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX, group=self.dp_group)
        return float(t.item())

    def _all_gather(self, obj: Any) -> list[Any]:
        if self.dist is None:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * tdist.get_world_size(self.dp_group)
        tdist.all_gather_object(out, obj, group=self.dp_group)
        return out

    def _share(self, count: int) -> tuple[int, int]:
        """This dp rank's contiguous slice [lo, hi) of ``count`` prompts (the first ranks take one more)."""
        base, extra = divmod(count, self.dp_size)
        lo = self.dp_rank * base + min(self.dp_rank, extra)
        return lo, lo + base + (self.dp_rank < extra)

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
            step_rows = self.next_rows(r.prompts_per_step - kept)  # every rank advances by the whole step's prompts
            lo, hi = self._share(len(step_rows))
            batch_rows = step_rows[lo:hi]
            seed = self.config.seed * 1_000_003 + self.step * 101 + attempts
            requests = [Request(self.task.render_prompt(row, self.tokenizer), n=r.n) for row in batch_rows]
            ids = {"first_request_id": lo} if lo else {}  # global request ids: the one-process random streams
            batch = self.engine.rollout(requests, self.sampling(seed), tools=self.task.tool_functions or None, **ids)
            attempts += 1
            ok = (batch.finish != ERROR).nonzero().squeeze(1).cpu()
            errors += batch.num_seqs - ok.numel()
            batch = batch.select(ok)
            if batch.num_seqs == 0:
                kept += int(self._all_sum(0.0))  # the other ranks' kept groups (a collective every rank joins)
                continue
            sampled += int(batch.sampled_lens.sum())
            seq_rows = [batch_rows[g] for g in batch.group.tolist()]
            completion_ids = batch.completion_ids()
            scored = self.task.score(seq_rows, completion_ids, tokenizer=self.tokenizer)
            self._check_rewards(scored, reward_errors)
            if not self.samples:
                self.samples = self._samples(batch, completion_ids, scored.total)
                for sample in self.samples:
                    sample["group"] += lo  # the step's prompt index, as one process numbers it
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
            kept += int(self._all_sum(float(batch.group[keep.to(batch.device)].unique().numel())))
        seconds = time.perf_counter() - start
        if self.dist is not None:  # the step's totals: tokens and errors summed, the slowest rank's time
            sampled, errors, seconds = self._all_sum(sampled), self._all_sum(errors), self._all_sum(seconds, "max")
            gathered, reward_errors = self._all_gather(reward_errors), {}
            for part in gathered:
                for name, n in part.items():
                    reward_errors[name] = reward_errors.get(name, 0) + n
            self.samples = [s for part in self._all_gather(self.samples) for s in part][:SAMPLES_PER_STEP]
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
        batch, rewards, reward_values, metrics = self.rollout() if self.sp_group is None else self._sp_rollout()
        self.engine.release_memory()  # the KV cache's memory is the update's until the next rollout
        everything = self._gathered(batch, rewards, reward_values)
        metrics.update(self._reward_metrics(*everything[:3]))
        if self._all_sum(float(batch.num_seqs > 0 and bool(batch.loss_mask.any()))) == 0:  # on every rank alike
            return {**metrics, "skipped": 1.0}
        advantages = self._advantages(rewards, batch.group.cpu(), *everything[3:])
        start = time.perf_counter()
        norm = self._all_sum(normalizer(batch, algo.agg))  # the whole step's count, over every dp rank
        if self.dist is not None:  # a sequence with nothing sampled adds nothing; dropped so every pass backprops
            keep_seqs = (batch.sampled_lens > 0).nonzero().squeeze(1)
            batch, advantages = batch.select(keep_seqs), advantages[keep_seqs.cpu()]
        micro = [
            MicroBatch(batch.select(index), advantages[index])
            for index in pack_micro_batches(batch.seq_lens.tolist(), cfg.optim.micro_batch_tokens)
        ]
        passes = int(self._all_sum(len(micro), "max"))  # FSDP: every rank runs as many forwards and backwards
        temperature, max_len = cfg.rollout.temperature, cfg.rollout.max_new_tokens
        if algo.updates_per_batch > 1:
            self.model.eval()
            fill_old_logprobs(self.model, micro, temperature, replay=algo.router_replay)
            for _ in range(passes - len(micro)):
                self._filler_pass(grad=False)
        self.model.train()
        for update in range(algo.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            reducer = MetricReducer(algo.loss)
            for mb in micro:
                parts = micro_batch_loss(self.model, mb, algo, temperature=temperature, max_len=max_len, norm=norm,
                                         first=update == 0)  # fmt: skip
                for name, (value, counts) in parts.items():
                    reducer.add(name, value, counts)
            for _ in range(passes - len(micro)):
                self._filler_pass(grad=True, reference=update == 0)
            if self.dist is not None:
                reducer.merge_across(self.dp_group)
            if update == 0:
                first = {k: v for k, v in reducer.result().items() if k.startswith(("mismatch/", "router/"))}
            grad_norm = self._clip_gradients()
            if not torch.isfinite(grad_norm) or not math.isfinite(reducer.result().get("loss", 0.0)):
                self.optimizer.zero_grad(set_to_none=True)
                metrics["skipped"] = 1.0  # non-finite loss or gradient: no update, the run goes on
                break
            self.optimizer.step()
            self._check_parameters()
        self.scheduler.step()
        self.model.eval()
        if self.dist is None:
            self.engine.update_weights()  # the engine runs this very model: the boundary, with nothing to copy
        else:
            from ossrl.dist.sync import sync_weights

            sync_weights(self.model, self.engine, lora=cfg.lora.enabled)
        metrics.update(reducer.result())
        metrics.update(first)
        train_seconds = max(time.perf_counter() - start, 1e-9)
        tokens = self._all_sum(float(batch.seq_lens.sum()))
        train_seconds = self._all_sum(train_seconds, "max")
        metrics.update(grad_norm=float(grad_norm), lr=self.scheduler.get_last_lr()[0],
                       train_tokens_per_s=tokens / train_seconds)  # fmt: skip
        metrics.setdefault("skipped", 0.0)
        if torch.cuda.is_available():
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    def _gathered(self, batch: RolloutBatch, rewards: torch.Tensor, values: dict[str, list]) -> tuple:
        """(what ``_reward_metrics`` needs of the whole step: batch stats, rewards, reward values; then every rank's
        rewards and groups, for the advantages). One process: its own batch."""
        if self.dist is None:
            return batch, rewards, values, None
        mine = {"rewards": rewards.tolist(), "group": batch.group.tolist(), "values": values,
                "sampled_lens": batch.sampled_lens.tolist(), "tool_calls": batch.num_tool_calls.tolist(),
                "finish": batch.finish.tolist()}  # fmt: skip
        parts = self._all_gather(mine)
        merged_values: dict[str, list] = {}
        for part in parts:
            for name, vals in part["values"].items():
                merged_values.setdefault(name, []).extend(vals)
        stats = _BatchStats(
            num_seqs=sum(len(p["rewards"]) for p in parts),
            sampled_lens=torch.tensor([n for p in parts for n in p["sampled_lens"]], dtype=torch.long),
            num_tool_calls=torch.tensor([n for p in parts for n in p["tool_calls"]], dtype=torch.long),
            finish=torch.tensor([n for p in parts for n in p["finish"]], dtype=torch.long),
        )
        all_rewards = torch.tensor([x for p in parts for x in p["rewards"]], dtype=torch.float32)
        return stats, all_rewards, merged_values, parts

    def _advantages(self, rewards: torch.Tensor, group: torch.Tensor, parts: list | None) -> torch.Tensor:
        """Advantages of this rank's sequences, computed over the whole step (each rank's groups numbered apart),
        so group baselines and batch statistics are the one-process ones."""
        algo = self.config.algorithm
        if parts is None:
            return rl.compute_advantages(algo.advantage, rewards, group, scale=algo.scale)
        groups, offset, start = [], 0, 0
        for rank, part in enumerate(parts):
            g = torch.tensor(part["group"], dtype=torch.long)
            if rank == _group_rank(self.dp_group):
                start = sum(len(q["rewards"]) for q in parts[:rank])
            groups.append(g + offset)
            offset += int(g.max()) + 1 if g.numel() else 0
        all_rewards = torch.tensor([x for p in parts for x in p["rewards"]], dtype=torch.float32)
        advantages = rl.compute_advantages(algo.advantage, all_rewards, torch.cat(groups), scale=algo.scale)
        return advantages[start : start + rewards.numel()]

    def _filler_pass(self, *, grad: bool, reference: bool = False) -> None:
        """A forward (and backward of zero) on two tokens, for a rank with fewer micro-batches than the others:
        FSDP's all-gathers and reduce-scatters need every rank in every pass. Changes no gradient. ``reference``:
        also the no-grad reference forward ``micro_batch_loss`` runs for KL on a batch's first update."""
        from ossrl.train.update import forward_logprobs

        filler = MicroBatch(pack_sequences([[0]], [[0]], device=self.device), torch.zeros(1))
        with torch.set_grad_enabled(grad):
            lp, _ = forward_logprobs(self.model, filler, self.config.rollout.temperature,
                                     replay=self.config.algorithm.router_replay)  # fmt: skip
            if grad:
                if reference and self.config.algorithm.kl_coef > 0:
                    with torch.no_grad(), disabled_lora(self.model):
                        forward_logprobs(self.model, filler, self.config.rollout.temperature)
                (lp.sum() * 0.0).backward()

    def _sp_rollout(self) -> tuple[RolloutBatch, torch.Tensor, dict[str, list], dict[str, float]]:
        """``rollout`` once per sequence-parallel group: the sp ranks of one dp rank train on the same batch (Ulysses
        splits it by tokens), so the group's first rank samples and scores it and sends it to the others, with the
        data position it reached and the step's samples. The rollout and its tool calls run once, not sp times.
        Only the first ranks of the sp groups (one dp group) meet in ``rollout``'s collectives."""
        import torch.distributed as tdist

        source = tdist.get_global_rank(self.sp_group, 0)
        payload: list[Any] = [None]
        if tdist.get_rank() == source:
            batch, rewards, values, metrics = self.rollout()
            payload = [(batch.to("cpu"), rewards, values, metrics, self.samples, self.position)]
        tdist.broadcast_object_list(payload, src=source, group=self.sp_group)
        batch, rewards, values, metrics, self.samples, self.position = payload[0]
        return batch.to(self.device), rewards, values, metrics

    def _clip_gradients(self) -> torch.Tensor:
        if self.dist is not None:
            from ossrl.dist.fsdp import sum_gradients

            sum_gradients(self.params, self.dp_size)
        if self.sp_group is not None:  # each sp rank back-propagated from its shard of the tokens: sum the parts
            from ossrl.dist.ulysses import sp_all_reduce_grads

            sp_all_reduce_grads(self.params, self.sp_group)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor over the shards: the global norm on every rank
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    def _check_parameters(self) -> None:
        """Stop the run when an update left a non-finite parameter: every later step would be garbage, and the
        last good checkpoint must stay the last one."""
        from ossrl.dist.fsdp import local

        finite = bool(torch.stack([local(p.detach()).isfinite().all() for p in self.params]).all())
        if self._all_sum(float(not finite)) > 0:  # some rank's shard: every rank stops
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
        if self.dist is not None:  # the engine's own model: the restored weights through the weight-sync boundary
            from ossrl.dist.sync import sync_weights

            sync_weights(self.model, self.engine, lora=self.config.lora.enabled)
