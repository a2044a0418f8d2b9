"""Every trainer option through the real ``Trainer.train_step`` on the tiny model, asserting what the option means.

Spies wrap the real functions (``ossrl.train.update.micro_batch_loss``, ``ossrl.rl``'s) and record what reached
them; rewards are replaced where a test needs known values (an untrained tiny model scores 0 everywhere)."""

from __future__ import annotations

import math

import pytest
import torch

from ossrl import rl
from ossrl.config import ConfigError, load_config
from ossrl.model.lora import disabled_lora
from ossrl.rollout import Engine
from ossrl.train import trainer as trainer_module
from ossrl.train import update as update_module
from ossrl.train.trainer import Trainer

BASE = [
    "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=3", "rollout.max_new_tokens=4", "rollout.max_turns=1",
    "rollout.kv_cache_tokens=2048", "model.dtype=float32", "model.gradient_checkpointing=false",
    "logging.progress=false", "optim.lr=1e-2", "lora.targets=[q_proj, v_proj]", "task.options={system_message: false}",
]  # fmt: skip
TIMING = ("seconds", "tokens_per_s", "peak_memory")


@pytest.fixture(autouse=True)
def same_weights_same_rollout(monkeypatch):
    """The engine is deterministic (tests/test_rollout*.py): a rollout of the same prompts with the same sampling
    from the same weights is reused across this module's trainers instead of being sampled again."""
    original = Engine.rollout

    def rollout(self, requests, sampling, tools=None):
        weights = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        key = (repr(sampling), tuple((tuple(r.prompt_ids), r.n) for r in requests), hash(weights.numpy().tobytes()))
        if key not in ROLLOUTS:
            ROLLOUTS[key] = original(self, requests, sampling, tools=tools)
        batch = ROLLOUTS[key]
        return batch.select(range(batch.num_seqs))  # a copy: tests may change what they get

    monkeypatch.setattr(Engine, "rollout", rollout)


ROLLOUTS: dict = {}


def make(*overrides: str) -> Trainer:
    return Trainer(load_config(None, [*BASE, *overrides]))


def fixed_rewards(trainer: Trainer, values) -> None:
    """Replace the task's total reward of sequence i of each scoring call with ``values(i)``."""
    original = trainer.task.score

    def score(rows, completions, tokenizer=None):
        out = original(rows, completions, tokenizer=tokenizer)
        out.total = [float(values(i)) for i in range(len(out.total))]
        return out

    trainer.task.score = score


def varied(i: int) -> float:  # rewards that differ inside every group of 3
    return [0.0, 1.0, 0.5, 1.0, 0.0, 0.25][i % 6]


class Recorder:
    """Wraps ``update.micro_batch_loss`` (the trainer calls it per micro-batch) and records its inputs/outputs."""

    def __init__(self, monkeypatch, before=None) -> None:
        self.calls: list[dict] = []
        original = update_module.micro_batch_loss

        def spy(model, mb, algo, **kwargs):
            extra = before(model, mb, algo, kwargs) if before else None
            out = original(model, mb, algo, **kwargs)
            self.calls.append({"mb": mb, "out": out, "extra": extra, **kwargs})
            return out

        monkeypatch.setattr(trainer_module, "micro_batch_loss", spy)


def group_stats(rewards: torch.Tensor, n: int):
    g = rewards.view(-1, n)
    return g, g.mean(1, keepdim=True), g.std(1, keepdim=True)


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("advantage,scale", [("grpo", None), ("grpo", "batch"), ("grpo", "none"), ("dr_grpo", None),
                                             ("rloo", None), ("rloo", "group")])  # fmt: skip
def test_advantage_estimators_reach_the_loss(monkeypatch, advantage, scale):
    overrides = [f"algorithm.advantage={advantage}"] + ([f"algorithm.scale={scale}"] if scale else [])
    trainer = make(*overrides)
    fixed_rewards(trainer, varied)
    rec = Recorder(monkeypatch)
    metrics = trainer.train_step()
    assert metrics["skipped"] == 0.0
    got = torch.cat([c["mb"].advantages for c in rec.calls])
    rewards = torch.tensor([varied(i) for i in range(6)])
    g, mean, std = group_stats(rewards, 3)
    centred = g - mean
    expected = {
        ("grpo", None): centred / (std + 1e-6),
        ("grpo", "batch"): centred / (rewards.std() + 1e-6),
        ("grpo", "none"): centred,
        ("dr_grpo", None): centred,  # no std division (this crashed at the first step before)
        ("rloo", None): centred * 3 / 2,  # leave-one-out baseline, no std scaling unless asked
        ("rloo", "group"): centred * 3 / 2 / (std + 1e-6),
    }[advantage, scale]
    torch.testing.assert_close(got, expected.reshape(-1))


# ---------------------------------------------------------------- losses and their eps


@pytest.mark.parametrize("loss", ["ppo", "gspo", "cispo"])
def test_eps_reach_every_clipped_loss(loss):
    """Two updates on one batch move the ratio off 1 in the second: with eps 0 the loss clips, with eps 10 never."""
    fractions = {}
    for eps in (0.0, 10.0):
        trainer = make(f"algorithm.loss={loss}", "algorithm.updates_per_batch=2", f"algorithm.eps_low={min(eps, 1)}",
                       f"algorithm.eps_high={eps}", "algorithm.agg=seq-mean-token-mean")  # fmt: skip
        fixed_rewards(trainer, varied)
        metrics = trainer.train_step()
        assert metrics["ratio_max"] != 1.0  # the second update's ratio is no longer 1
        fractions[eps] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    assert fractions[0.0] > 0 and fractions[10.0] == 0.0


def test_dual_clip_reaches_ppo():
    trainer = make("algorithm.updates_per_batch=2", "algorithm.dual_clip=1.000001", "algorithm.eps_low=0",
                   "algorithm.eps_high=0")  # fmt: skip
    fixed_rewards(trainer, varied)
    assert trainer.train_step()["dual_clip_frac"] > 0


def test_plain_policy_gradient_loss(monkeypatch):
    """loss=pg is -A logp per token (token-mean), not PPO's -A ratio (which is -A on-policy), and never clips."""

    def logprobs(model, mb, algo, kwargs):
        with torch.no_grad():
            return update_module.forward_logprobs(model, mb, kwargs["temperature"])[0]

    rec = Recorder(monkeypatch, before=logprobs)
    trainer = make("algorithm.loss=pg")
    fixed_rewards(trainer, varied)
    metrics = trainer.train_step()
    assert "clip_frac_low" not in metrics and metrics["ratio_mean"] == 1.0
    tokens = sum(int(c["mb"].batch.loss_mask.sum()) for c in rec.calls)
    expected = 0.0
    for c in rec.calls:
        batch = c["mb"].batch
        expected += float(-(c["mb"].advantages[batch.seq_index[batch.loss_mask]] * c["extra"]).sum()) / tokens
    assert math.isclose(metrics["policy_loss"], expected, rel_tol=1e-4, abs_tol=1e-6)


# ---------------------------------------------------------------- aggregation and micro-batching


def step_metrics(*overrides: str) -> tuple[dict[str, float], list[torch.Tensor]]:
    trainer = make(*overrides)
    fixed_rewards(trainer, varied)
    metrics = trainer.train_step()
    params = [p.detach().clone() for p in trainer.params]
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}, params


@pytest.mark.parametrize("loss,agg", [("ppo", "token-mean"), ("ppo", "seq-mean-token-mean"),
                                      ("ppo", "seq-mean-token-sum-norm"), ("gspo", "seq-mean-token-mean"),
                                      ("cispo", "token-mean")])  # fmt: skip
def test_every_metric_and_the_update_are_the_same_in_one_micro_batch_or_many(loss, agg):
    options = [f"algorithm.loss={loss}", f"algorithm.agg={agg}", "algorithm.updates_per_batch=2",
               "algorithm.kl_coef=0.05", "algorithm.entropy_coef=0.01", "algorithm.seq_mask_hi=1.5"]  # fmt: skip
    whole, params_whole = step_metrics(*options, "optim.micro_batch_tokens=100000")
    cut, params_cut = step_metrics(*options, "optim.micro_batch_tokens=1")  # one sequence per micro-batch
    assert whole.keys() == cut.keys()
    for key in whole:
        assert math.isclose(whole[key], cut[key], rel_tol=1e-4, abs_tol=1e-6), (key, whole[key], cut[key])
    # Adam amplifies rounding in near-zero gradients: compare the updates as a whole
    start = [p.detach() for p in make(*options).params]
    moved = torch.cat([(a - s).reshape(-1) for a, s in zip(params_whole, start, strict=True)])
    moved_cut = torch.cat([(b - s).reshape(-1) for b, s in zip(params_cut, start, strict=True)])
    assert moved.norm() > 0 and (moved - moved_cut).norm() / moved.norm() < 1e-3


def test_every_reported_metric_declares_its_reduction():
    for loss in rl.POLICY_LOSSES:
        for name in update_module.METRIC_REDUCTIONS:
            update_module.reduction_of(name, loss)
    with pytest.raises(KeyError, match="no declared reduction"):
        update_module.reduction_of("made_up", "ppo")


# ---------------------------------------------------------------- KL and entropy


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_is_to_the_model_without_adapters(monkeypatch, kind):
    def expected_kl(model, mb, algo, kwargs):
        batch = mb.batch
        with torch.no_grad():
            lp, _ = update_module.forward_logprobs(model, mb, kwargs["temperature"])
            with disabled_lora(model):
                ref, _ = update_module.forward_logprobs(model, mb, kwargs["temperature"])
        idx = batch.seq_index[batch.loss_mask]
        return rl.kl_loss(lp, ref, torch.ones_like(lp, dtype=torch.bool), kind=kind, normalizer=kwargs["norm"],
                          seq_index=idx, num_seqs=batch.num_seqs)  # fmt: skip

    rec = Recorder(monkeypatch, before=expected_kl)
    trainer = make("algorithm.kl_coef=0.1", f"algorithm.kl_kind={kind}")
    fixed_rewards(trainer, varied)
    first = trainer.train_step()
    assert first["kl"] == 0.0  # adapters start with B = 0: the policy is the reference
    second = trainer.train_step()
    calls = rec.calls[len(rec.calls) // 2 :]
    expected = sum(float(c["extra"]) for c in calls)
    assert second["kl"] != 0.0 and math.isclose(second["kl"], expected, rel_tol=1e-5, abs_tol=1e-9)
    assert math.isclose(second["loss"], second["policy_loss"] + 0.1 * second["kl"], rel_tol=1e-5, abs_tol=1e-9)


def test_entropy_bonus_is_subtracted_from_the_loss():
    trainer = make("algorithm.entropy_coef=0.01")
    fixed_rewards(trainer, varied)
    m = trainer.train_step()
    assert m["entropy"] > 0
    assert math.isclose(m["loss"], m["policy_loss"] - 0.01 * m["entropy"], rel_tol=1e-5, abs_tol=1e-9)


# ---------------------------------------------------------------- sampler/trainer mismatch: TIS and masking


def shifted_sampler(trainer: Trainer, shift_groups: set[int], by: float = 1.0) -> None:
    """The sampler's log-probs of the sequences of some groups are lowered by ``by`` (a simulated mismatch)."""
    original = trainer.engine.rollout

    def rollout(*args, **kwargs):
        batch = original(*args, **kwargs)
        token_group = batch.group[batch.seq_index]
        hit = torch.isin(token_group, torch.tensor(sorted(shift_groups))) & batch.loss_mask
        batch.sampler_logprobs = torch.where(hit, batch.sampler_logprobs - by, batch.sampler_logprobs)
        return batch

    trainer.engine.rollout = rollout


def test_truncated_importance_weights_multiply_the_loss(monkeypatch):
    rec = Recorder(monkeypatch)
    trainer = make("algorithm.tis_cap=2.0")
    fixed_rewards(trainer, varied)
    shifted_sampler(trainer, {0})  # group 0: trainer - sampler = +1 per token: weight min(e, 2) = 2
    m = trainer.train_step()
    batch = torch.cat([c["mb"].batch.group[c["mb"].batch.seq_index[c["mb"].batch.loss_mask]] for c in rec.calls])
    adv = torch.cat([c["mb"].advantages[c["mb"].batch.seq_index[c["mb"].batch.loss_mask]] for c in rec.calls])
    weights = torch.where(batch == 0, 2.0, 1.0)
    assert math.isclose(m["mismatch/tis_capped_frac"], float((batch == 0).float().mean()), rel_tol=1e-6)
    assert math.isclose(m["policy_loss"], float(-(adv * weights).sum() / adv.numel()), rel_tol=1e-4, abs_tol=1e-6)
    assert m["mismatch/mean_abs_diff"] > 0.3


def test_sequence_masking_drops_mismatched_sequences(monkeypatch):
    rec = Recorder(monkeypatch)
    trainer = make("algorithm.seq_mask_hi=1.5", "algorithm.tis_cap=null")
    fixed_rewards(trainer, varied)
    shifted_sampler(trainer, {1})  # rho = e > 1.5: group 1 is masked out of the loss
    m = trainer.train_step()
    assert math.isclose(m["mismatch/seq_masked_frac"], 0.5)
    groups = torch.cat([c["mb"].batch.group[c["mb"].batch.seq_index[c["mb"].batch.loss_mask]] for c in rec.calls])
    adv = torch.cat([c["mb"].advantages[c["mb"].batch.seq_index[c["mb"].batch.loss_mask]] for c in rec.calls])
    kept = groups == 0
    # token-mean over all sampled tokens (the normalizer), masked tokens contribute 0
    assert math.isclose(m["policy_loss"], float(-(adv * kept).sum() / adv.numel()), rel_tol=1e-4, abs_tol=1e-6)


def test_second_update_compares_the_sampler_with_the_policy_that_sampled(monkeypatch):
    seen = []
    original = rl.truncated_is_weights

    def spy(trainer_logprobs, sampler_logprobs, mask, **kwargs):
        seen.append(trainer_logprobs.clone())
        return original(trainer_logprobs, sampler_logprobs, mask, **kwargs)

    monkeypatch.setattr(rl, "truncated_is_weights", spy)
    trainer = make("algorithm.updates_per_batch=2", "optim.micro_batch_tokens=100000")
    fixed_rewards(trainer, varied)
    m = trainer.train_step()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # both updates: the pre-update log-probs
    assert m["ratio_max"] > 1.0 and m["ratio_mean"] != 1.0  # while the second update's ratio moved
    assert m["mismatch/max_abs_diff"] < 1e-4  # the mismatch is measured on the policy that sampled (fp32: ~1e-7)


# ---------------------------------------------------------------- DAPO: dynamic sampling, overlong penalty


def test_dynamic_sampling_replaces_groups_with_equal_rewards(monkeypatch):
    rec = Recorder(monkeypatch)
    trainer = make("algorithm.dynamic_sampling=true", "algorithm.max_refills=3")
    calls = []
    original = trainer.task.score

    def score(rows, completions, tokenizer=None):  # the first call's group 0 is all equal, the rest vary
        out = original(rows, completions, tokenizer=tokenizer)
        flat = len(calls) == 0
        out.total = [0.5 if flat and i < 3 else varied(i) for i in range(len(out.total))]
        calls.append(len(out.total))
        return out

    trainer.task.score = score
    m = trainer.train_step()
    assert calls == [6, 3]  # one refill prompt for the dropped group
    assert m["groups_kept"] == 2 and trainer.position == 3
    adv = torch.cat([c["mb"].advantages for c in rec.calls]).view(-1, 3)
    assert bool((adv.abs().sum(1) > 0).all())  # no group with all-zero advantages reached the loss


def test_overlong_penalty_is_added_to_the_reward(monkeypatch):
    seen = {}
    original = rl.compute_advantages

    def spy(name, rewards, group_ids, **kwargs):
        seen["rewards"] = rewards.clone()
        return original(name, rewards, group_ids, **kwargs)

    monkeypatch.setattr(rl, "compute_advantages", spy)
    trainer = make("algorithm.overlong_buffer=2", "algorithm.overlong_penalty=0.5")
    fixed_rewards(trainer, varied)
    batches = []
    original_rollout = trainer.engine.rollout
    trainer.engine.rollout = lambda *a, **k: batches.append(original_rollout(*a, **k)) or batches[-1]
    trainer.train_step()
    lengths = batches[0].sampled_lens
    expected = torch.tensor([varied(i) for i in range(6)]) + rl.overlong_penalty(lengths, 4, 2, penalty=0.5)
    torch.testing.assert_close(seen["rewards"], expected)
    assert bool((lengths == 4).any())  # an untrained model runs to the limit: the penalty applied somewhere


# ---------------------------------------------------------------- full fine-tuning


def test_full_fine_tuning_updates_the_base_weights():
    trainer = make("lora.enabled=false")
    fixed_rewards(trainer, varied)
    assert not any("lora" in n for n, _ in trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.weight" in before
    assert trainer.train_step()["skipped"] == 0.0
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed


# ---------------------------------------------------------------- config validation


def test_impossible_combinations_fail_before_anything_loads():
    cases = {
        "algorithm.scale": ["algorithm.advantage=dr_grpo", "algorithm.scale=group"],
        "algorithm.eps_low/eps_high": ["algorithm.loss=pg", "algorithm.eps_high=0.3"],
        "algorithm.dual_clip": ["algorithm.loss=gspo", "algorithm.dual_clip=3"],
        "rollout.n": ["rollout.n=1"],
        "algorithm.overlong_buffer": ["rollout.max_new_tokens=8", "algorithm.overlong_buffer=9"],
        "lora.targets": ["lora.targets=[q_proj, mlp]"],
    }
    for field, overrides in cases.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("/", "/")):
            load_config(None, overrides)
    with pytest.raises(ConfigError) as info:  # several problems: one message names them all
        load_config(None, ["optim.lr=.inf", "rollout.top_p=2", "algorithm.tis_cap=0", "algorithm.eps_low=-1"])
    for field in ("optim.lr", "rollout.top_p", "algorithm.tis_cap", "algorithm.eps_low"):
        assert field in str(info.value)
