"""The trainer: chunked log-probs, configs, an exact resume, and `ossrl train` end to end on a tiny setting."""

import json

import pytest
import torch

from ossrl.config import ConfigError, load_config
from ossrl.train.logprobs import token_logprobs


def test_chunked_logprobs_equal_full_log_softmax_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    lp, ent = token_logprobs(head, hidden, targets, temperature=0.7, chunk_size=8)
    full = torch.log_softmax(head(hidden) / 0.7, -1)
    ref_lp = full.gather(-1, targets[:, None]).squeeze(1)
    ref_ent = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    (g,) = torch.autograd.grad((lp * torch.arange(37.0)).sum() + ent.sum(), hidden)
    (ref_g,) = torch.autograd.grad((ref_lp * torch.arange(37.0)).sum() + ref_ent.sum(), hidden)
    torch.testing.assert_close(g, ref_g)


def test_bad_configs_name_the_field_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config field 'optim.lrr'; did you mean 'lr'"):
        load_config(None, ["optim.lrr=1e-5"])
    with pytest.raises(ConfigError, match=r"algorithm.loss: 'ppo2' is not one of \['ppo', 'gspo', 'cispo', 'pg'\]"):
        load_config(None, ["algorithm.loss=ppo2"])
    with pytest.raises(ConfigError, match="rollout.n: expected an integer"):
        load_config(None, ["rollout.n=four"])
    with pytest.raises(ConfigError, match="algorithm.kl_coef: KL to the reference needs LoRA"):
        load_config(None, ["algorithm.kl_coef=0.1", "lora.enabled=false"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1e-5\nrollout:\n  n: 8\n")
    config = load_config(recipe, ["optim.lr=3e-6"])
    assert config.optim.lr == 3e-6 and config.rollout.n == 8
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_recipes_load():
    from pathlib import Path

    for recipe in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(recipe)


TINY_RUN = [
    "steps=3", "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
    "rollout.max_turns=2", "task.eval_limit=2", "checkpoint.every=1", "model.dtype=float32",
    "model.gradient_checkpointing=false", "logging.progress=false", "optim.lr=1e-2",
    "lora.targets=[q_proj, v_proj, gate_up_proj]", "task.options={system_message: false}",
]  # fmt: skip
TIMING = ("time", "tokens_per_s", "seconds", "peak_memory")


def run_metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def test_killed_and_resumed_run_gives_the_same_metrics(tmp_path, monkeypatch):
    from ossrl.train import trainer as trainer_module
    from ossrl.train.run import run_training

    common = [*TINY_RUN, f"warmup.cache_dir={tmp_path / 'cache'}"]
    run_training(load_config(None, [*common, f"logging.run_dir={tmp_path / 'straight'}"]))

    original, calls = trainer_module.Trainer.train_step, []

    def dies_at_step_3(self):
        calls.append(self.step)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_training(load_config(None, [*common, f"logging.run_dir={tmp_path / 'killed'}"]))
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    run_training(load_config(None, [*common, f"logging.run_dir={tmp_path / 'killed'}", "checkpoint.resume=true"]))

    straight, resumed = run_metrics(tmp_path / "straight"), run_metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert straight == resumed
    samples = {name: [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
               for name in ("straight", "killed")}  # fmt: skip
    assert samples["straight"] == samples["killed"]  # the killed run's samples after its checkpoint were dropped
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert "accuracy" in summary["eval_before"] and "accuracy" in summary["eval_after"]
    assert (tmp_path / "killed" / "report.png").stat().st_size > 1000
    adapter = tmp_path / "killed" / "checkpoints" / "checkpoint-000003" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()


def test_ossrl_train_cli_rejects_bad_overrides(capsys):
    from ossrl.cli import main

    assert main(["train", "rollout.temperature=0"]) == 2
    assert "rollout.temperature" in capsys.readouterr().err


def test_embedded_tiny_recipe_matches_configs_tiny_cpu_yaml():
    from pathlib import Path

    import yaml

    from ossrl.recipes import TINY_CPU

    text = (Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml").read_text()
    assert yaml.safe_load(text) == TINY_CPU


def test_warm_start_trains_in_two_phases_and_is_cached(tmp_path, monkeypatch):
    from ossrl.tasks import get_task
    from ossrl.train import warm_start

    overrides = ["warmup.steps=4", "warmup.tool_first_steps=2", "warmup.examples=8", "warmup.batch_size=2",
                 "warmup.tool_fraction=0.0", f"warmup.cache_dir={tmp_path}", "task.options={system_message: false}",
                 "model.dtype=float32"]  # fmt: skip
    config = load_config(None, overrides)
    task = get_task("arithmetic", system_message=False)
    seen = []  # per step: whether the batch's demonstrations call the tool
    original = warm_start.sampled_logprobs

    def spy(model, batch):
        seen.append(set((batch.completion_lens != batch.sampled_lens).tolist()))  # a tool result is unmasked
        return original(model, batch)

    monkeypatch.setattr(warm_start, "sampled_logprobs", spy)
    model, _, info = warm_start.load_starting_point(config, task, torch.device("cpu"), torch.float32)
    assert seen == [{True}, {True}, {False}, {False}]  # tool-only phase, then tool_fraction=0
    assert info["warmup/loss"] > 0 and (tmp_path / info["warm_start"].split("/")[-1] / "config.json").exists()
    again, _, info2 = warm_start.load_starting_point(config, task, torch.device("cpu"), torch.float32)
    assert len(seen) == 4 and info2["warm_start"] == info["warm_start"]  # reused, not retrained
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    other = load_config(None, [*overrides, "warmup.tool_first_steps=1"])
    other_info = warm_start.load_starting_point(other, task, torch.device("cpu"), torch.float32)[2]
    assert other_info["warm_start"] != info["warm_start"]  # the settings are in the cache key
    with pytest.raises(ConfigError, match="warmup.tool_first_steps: must be in"):
        load_config(None, [*overrides, "warmup.tool_first_steps=5"])
    from ossrl.recipes import TINY_CPU

    assert load_config(None, ["warmup.steps=0"], base=TINY_CPU).warmup.steps == 0  # no warm start: no complaint
