"""Deterministic mode end to end on the tiny model: the engine's sampled-token log-probs equal the trainer's
(``packed_logprobs``, the loss's forward; ``logprobs_of``) bit for bit, in fp32 and bf16, whatever the packing and
for each sequence alone; a request samples the same tokens and log-probs alone as among 64; a multi-turn tool
episode too; and a ``Trainer.train_step`` reports ``mismatch/*`` = 0 (and warns once when it cannot)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from rollout_helpers import prompts

import ossrl
from ossrl.config import load_config
from ossrl.model.lora import lora_adapters
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.train import logprobs_of
from ossrl.train.logprobs import packed_logprobs
from ossrl.train.trainer import Trainer


def in_dtype(model, dtype):
    return model if dtype == torch.float32 else copy.deepcopy(model).set_dtype(dtype)


def trainer_logprobs(model, batch, temperature):
    with torch.no_grad():
        lp, _ = packed_logprobs(model, batch.tokens, batch.cu_seqlens, batch.loss_mask, temperature=temperature)
    return lp


def assert_trainer_equals_sampler(model, batch, temperature):
    """The loss's forward over the whole batch, over the batch in another order, and over each sequence alone."""
    assert torch.equal(trainer_logprobs(model, batch, temperature), batch.sampler_logprobs[batch.loss_mask])
    order = torch.randperm(batch.num_seqs, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = batch.select(order)
    assert torch.equal(trainer_logprobs(model, shuffled, temperature), shuffled.sampler_logprobs[shuffled.loss_mask])
    for i in range(batch.num_seqs):
        alone = batch.select([i])
        assert torch.equal(trainer_logprobs(model, alone, temperature), alone.sampler_logprobs[alone.loss_mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_logprobs_are_the_trainers_bit_for_bit(tiny, dtype):
    model, tokenizer = tiny
    model = in_dtype(model, dtype)
    ps = prompts(5)
    sampling = SamplingParams(temperature=0.8, max_new_tokens=10, stop_token_ids=[], seed=4)
    with ossrl.deterministic():
        # 4 sequences at a time: requests are admitted in waves, so decode batches change size as they go
        batch = Engine(model, tokenizer, kv_cache_tokens=2048, max_num_seqs=4).rollout(
            [Request(p, n=2) for p in ps], sampling
        )
        assert_trainer_equals_sampler(model, batch, 0.8)
        with torch.no_grad():
            got = logprobs_of(model, batch.prompt_ids(), batch.completion_ids(), temperature=0.8)
        want = batch.sampler_logprobs.split(batch.seq_lens.tolist())
        for g, w, p in zip(got, want, batch.prompt_lens.tolist(), strict=True):
            assert torch.equal(g, w[p:])
        greedy = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])
        batch = Engine(model, tokenizer, kv_cache_tokens=2048).rollout([Request(p) for p in ps], greedy)
        assert_trainer_equals_sampler(model, batch, 1.0)  # greedy: log_softmax(logits), the trainer's T = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_request_samples_the_same_alone_and_among_64(tiny, dtype):
    model, tokenizer = tiny
    model = in_dtype(model, dtype)
    target = prompts(1, lengths=(19,))[0]
    crowd = [Request(target), *[Request(p) for p in prompts(63, lengths=(3, 30, 12, 51, 7, 40))]]
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=11)
    with ossrl.deterministic():
        alone = Engine(model, tokenizer, kv_cache_tokens=1024).rollout([Request(target)], sampling)
        among = Engine(model, tokenizer, kv_cache_tokens=16384).rollout(crowd, sampling).select([0])
    assert torch.equal(among.tokens, alone.tokens)
    assert torch.equal(among.sampler_logprobs, alone.sampler_logprobs)
    assert torch.equal(among.token_fields["routes"], alone.token_fields["routes"])


class CallProneHead(torch.nn.Module):
    """The real lm_head plus a bonus for ``<|call|>`` wherever a hidden state's first coordinate is high: a pure
    function of each row (the engine and the trainer compute the same thing, batch-invariant), so the tiny model ends
    turns in tool calls now and then. A call that does not parse gets an error message as its tool result: the
    episode goes on either way."""

    def __init__(self, head: torch.nn.Module, call_id: int) -> None:
        super().__init__()
        self.head, self.call_id = head, call_id

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        bonus = torch.zeros_like(logits)
        bonus[..., self.call_id] = 40.0 * (hidden[..., 0] > 1.3).to(logits.dtype)
        return logits + bonus


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tool_calling_episode_is_bitwise_too(tiny, dtype):
    model, tokenizer = tiny
    policy = copy.deepcopy(in_dtype(model, dtype))
    policy.lm_head = CallProneHead(policy.lm_head, tokenizer.convert_tokens_to_ids("<|call|>"))
    calls = []

    def add(a=0, b=0):
        calls.append((a, b))
        return a + b

    sampling = SamplingParams(temperature=1.0, max_new_tokens=40, max_turns=3, seed=2, max_tool_tokens=32)
    with ossrl.deterministic():
        engine = Engine(policy, tokenizer, kv_cache_tokens=4096, append_chunk=5)  # tool results fed 5 at a time
        batch = engine.rollout([Request(p, n=2) for p in prompts(4)], sampling, tools={"add": add})
        appended = (~batch.loss_mask).sum() - batch.prompt_lens.sum()
        assert int(batch.num_tool_calls.sum()) >= 2 and int(appended) > 10  # multi-turn: tool results went in
        assert_trainer_equals_sampler(policy, batch, 1.0)


TRAIN = [
    "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=6", "rollout.max_turns=1",
    "rollout.kv_cache_tokens=2048", "logging.progress=false", "optim.lr=1e-2", "task.options={system_message: false}",
    "lora.r=4", "lora.targets=[q_proj, v_proj, gate_up_proj, down_proj, router]", "deterministic=true",
]  # fmt: skip


def randomize_adapters(trainer: Trainer) -> None:
    """LoRA's B starts at 0 (no effect): random B, so the adapters on attention, experts and router change outputs."""
    with torch.no_grad():
        for adapter in lora_adapters(trainer.model):
            adapter.lora_B.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_train_step_in_deterministic_mode_reads_zero_mismatch(dtype, caplog):
    trainer = Trainer(load_config(None, [*TRAIN, f"model.dtype={dtype}", "algorithm.updates_per_batch=2"]))
    randomize_adapters(trainer)
    score = trainer.task.score

    def varied(rows, completions, tokenizer=None):  # rewards that differ in each group: a real update
        out = score(rows, completions, tokenizer=tokenizer)
        out.total = [float(i % 2) for i in range(len(out.total))]
        return out

    trainer.task.score = varied
    start = [p.detach().clone() for p in trainer.params]
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # the second step samples with the weights the first one updated
            metrics = trainer.train_step()
            trainer.step += 1
            assert metrics["skipped"] == 0.0
            assert metrics["mismatch/max_abs_diff"] == 0.0 and metrics["mismatch/mean_abs_diff"] == 0.0
            assert metrics["mismatch/kl_k3"] == 0.0 and metrics["router/route_mismatch_frac"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.params, strict=True))
    assert not ossrl.is_deterministic()  # the trainer's mode lasts for its own calls only
    assert not [r for r in caplog.records if "deterministic mode" in r.getMessage()]


def test_the_trainer_warns_once_when_deterministic_mode_cannot_hold(caplog):
    # LoRA dropout: the training forward (dropout on) is not the policy that sampled
    trainer = Trainer(load_config(None, [*TRAIN, "model.dtype=float32", "lora.targets=[q_proj, v_proj]",
                                         "lora.dropout=0.5"]))  # fmt: skip
    randomize_adapters(trainer)  # B != 0: the adapters (and their dropout) change the output
    with caplog.at_level(logging.WARNING, logger="ossrl.train.trainer"):
        for _ in range(2):
            assert trainer.train_step()["mismatch/max_abs_diff"] > 0
            trainer.step += 1
    assert len([r for r in caplog.records if "deterministic mode" in r.getMessage()]) == 1
