"""``ossrl memory``: the planner against measured peaks (the same tracker on real CPU tensors; process RSS), its CLI,
the train fit check, and the recipes' goals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ossrl.cli import main
from ossrl.config import load_config
from ossrl.memory.planner import Planner, measure, plan
from ossrl.memory.tracker import DeviceTracker
from ossrl.model.config import GptOssConfig

ROOT = Path(__file__).parents[1]
SMALL = dict(vocab_size=8192, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096)  # fmt: skip
STEP = ["rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=128", "rollout.max_turns=1",
        "optim.micro_batch_tokens=1024", "model.device=cpu"]  # fmt: skip


def model_dir(tmp_path: Path, mxfp4: bool = False, **overrides) -> Path:
    data = GptOssConfig(**{**SMALL, **overrides}).to_hf_dict()
    if mxfp4:
        data["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_tracker_counts_fake_tensors_as_real_ones():
    from torch._subclasses.fake_tensor import FakeTensorMode

    peaks = []
    for fake in (False, True):
        device = "meta" if fake else "cpu"
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else torch.device("cpu"):
            w = torch.empty(256, 256, device=device, requires_grad=True)
            tracker = DeviceTracker(device)
            tracker.register([w])
            with tracker:
                x = torch.empty(1024, 256, device=device)
                (x @ w).relu().sum().backward()
                del x
            peaks.append((tracker.peak, tracker.current))
    assert peaks[0] == peaks[1]
    assert peaks[0][1] == 2 * 256 * 256 * 4  # the weight and its gradient are left
    assert peaks[0][0] >= 256 * 256 * 4 + 1024 * 256 * 4 * 3  # w + x, x @ w and relu's output at once


@pytest.mark.parametrize(("mxfp4", "dtype"), [(False, "float32"), (True, "float32")])
def test_plan_matches_the_same_step_measured_on_cpu(tmp_path, mxfp4, dtype):
    """Planned (shape-only tensors, the GPU's kernels) vs measured (random weights, real CPU tensors, the CPU's
    kernels) within 10% for each phase, with gradient checkpointing (the recipes' setting)."""
    config = load_config(None, [f"model.path={model_dir(tmp_path, mxfp4)}", f"model.dtype={dtype}", *STEP])
    planned = Planner(config).plan(prompt_tokens=64)
    measured = measure(config, "cpu", prompt_tokens=64)
    assert planned.rollout_peak_gib == pytest.approx(measured["rollout"], rel=0.10)
    assert planned.train_peak_gib == pytest.approx(measured["train"], rel=0.10)
    assert planned.breakdown["rollout"]["kv_cache"] > 0 and planned.breakdown["train"]["kv_cache"] == 0


def test_planning_never_takes_the_reference_attention(tmp_path, monkeypatch):
    import ossrl.kernels as kernels

    def refuse(*args, **kwargs):
        raise AssertionError("planning fell back to the O(N^2) reference attention")

    monkeypatch.setattr(kernels, "sink_attention_ref", refuse)
    config = load_config(None, [f"model.path={model_dir(tmp_path, True)}", "model.dtype=bfloat16", *STEP])
    result = Planner(config).plan(prompt_tokens=64)
    assert result.train_peak_gib > result.breakdown["train"]["weights"]


def test_memory_options_lower_the_planned_train_peak(tmp_path):
    path = model_dir(tmp_path, True, num_hidden_layers=6)
    base = [f"model.path={path}", "model.dtype=bfloat16", *STEP, "optim.micro_batch_tokens=4096",
            "rollout.max_new_tokens=960"]  # fmt: skip
    peaks = {}
    options = {"none": ["model.gradient_checkpointing=false"], "ckpt": [],
               "offload": ["model.offload_activations=true", "model.offload_embeddings=true"]}  # fmt: skip
    for name, extra in options.items():
        peaks[name] = Planner(load_config(None, base + extra)).plan(prompt_tokens=64).train_peak_gib
    assert peaks["none"] > peaks["ckpt"] > peaks["offload"]


def test_plan_searches_the_largest_n_and_context(tmp_path):
    config = load_config(None, [f"model.path={model_dir(tmp_path)}", "model.dtype=bfloat16", *STEP])
    first = plan(config, None, prompt_tokens=64)
    budget = first.peak_gib + 1.0 + 0.05  # + the CUDA overhead: a little room over the config's own step
    result = plan(config, budget, prompt_tokens=64)
    assert result.fits
    assert result.max_n is not None and result.max_n >= config.rollout.n
    assert result.max_context is not None and result.max_context >= 192
    n = result.max_n * 4
    bigger = load_config(None, [f"model.path={model_dir(tmp_path)}", "model.dtype=bfloat16", *STEP, f"rollout.n={n}",
                                f"rollout.max_num_seqs={n}"])  # fmt: skip
    assert not plan(bigger, budget, search=False).fits


def test_a_kv_cache_too_small_for_one_request_does_not_fit(tmp_path):
    config = load_config(None, [f"model.path={model_dir(tmp_path)}", *STEP, "rollout.kv_cache_tokens=256"])
    result = Planner(config).plan(prompt_tokens=64, gpu_gib=64)
    assert result.fits is False and any("kv_cache_tokens=256" in note for note in result.notes)


def test_cli_memory_json_and_table(tmp_path, capsys):
    args = ["memory", "configs/tiny_cpu.yaml", "rollout.n=2", "--no-search"]
    assert main([*args, "--json", "--gpu-gib", "8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"rollout_peak_gib", "train_peak_gib", "breakdown", "fits"} <= data.keys()
    assert data["fits"] is True
    assert set(data["breakdown"]) == {"rollout", "train"}
    assert {"weights", "adapters_optimizer", "kv_cache", "activations"} <= data["breakdown"]["train"].keys()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "kv_cache" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["memory", "configs/tiny_cpu.yaml", "rollout.n=0"], "rollout.n"),
    (["memory", "missing.yaml"], "no such config file"),
    (["memory", "configs/tiny_cpu.yaml", "model.path=/nowhere"], "model.path"),
    (["memory", "configs/tiny_cpu.yaml", "--gpu-gib", "-1"], "--gpu-gib"),
])  # fmt: skip
def test_cli_memory_bad_input_is_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("ossrl memory: ") and "Traceback" not in err


def test_train_refuses_a_config_that_cannot_fit_before_loading(monkeypatch, capsys, tmp_path):
    import ossrl.train.run as run
    import ossrl.train.trainer as trainer

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the fit check")

    monkeypatch.setattr(trainer, "load_starting_point", no_load)
    monkeypatch.setattr(run, "Trainer", no_load)
    monkeypatch.setenv("OSSRL_GPU_GIB", "1.05")  # 0.05 GiB once the CUDA overhead is set aside
    code = main(["train", "configs/tiny_cpu.yaml", f"logging.run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit the GPU (1.05 GiB)" in err and "nothing was loaded" in err
    assert "rollout.max_new_tokens" in err or "optim.micro_batch_tokens" in err  # what to change
    assert "peak" in err and "kv_cache" in err  # the planner's numbers


def test_the_python_api_refuses_a_config_that_cannot_fit_before_loading(monkeypatch, tmp_path):
    import ossrl
    import ossrl.train.run as run
    import ossrl.train.trainer as trainer
    from ossrl.memory.fit import DoesNotFit

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the fit check")

    monkeypatch.setattr(trainer, "load_starting_point", no_load)
    monkeypatch.setattr(run, "Trainer", no_load)
    monkeypatch.setenv("OSSRL_GPU_GIB", "1.05")
    grpo = ossrl.GRPOTrainer(args=str(ROOT / "configs/tiny_cpu.yaml"), steps=1)
    grpo.config.logging.run_dir = str(tmp_path)
    with pytest.raises(DoesNotFit, match=r"does not fit the GPU \(1.05 GiB\); nothing was loaded"):
        grpo.train()


def test_train_fit_check_passes_a_config_that_fits(monkeypatch):
    from ossrl.memory.fit import memory_refusal

    config = load_config(ROOT / "configs/tiny_cpu.yaml")
    monkeypatch.setenv("OSSRL_GPU_GIB", "16")
    assert memory_refusal(config) is None
    monkeypatch.setenv("OSSRL_GPU_GIB", "0")  # off
    assert memory_refusal(config) is None
    monkeypatch.delenv("OSSRL_GPU_GIB")
    assert memory_refusal(load_config(ROOT / "configs/tiny_cpu.yaml", ["model.device=cpu"])) is None  # no CUDA


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from ossrl.config import load_config
    from ossrl.memory.planner import _optimizer, build_model, rollout_phase, step_shape, train_phase
    from ossrl.memory.tracker import DeviceTracker

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def reset_peak():
        Path("/proc/self/clear_refs").write_text("5")

    torch.set_num_threads(2)
    config = load_config(None, sys.argv[1:])
    base = rss("VmRSS")
    model = build_model(config, torch.device("cpu"))
    params, optimizer = _optimizer(config, model)
    shape = step_shape(config, model.config, 64)
    out = {}
    for phase in ("rollout", "train"):
        reset_peak()
        tracker = DeviceTracker("cpu")
        if phase == "rollout":
            rollout_phase(model, config, shape, optimizer, tracker)
        else:
            train_phase(model, config, shape, params, optimizer, tracker)
        out[phase] = (rss("VmHWM") - base) / 2**30
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_plan_matches_process_rss_when_tensors_dominate(tmp_path):
    """A model whose tensors dwarf the interpreter's own memory (~0.9 GiB of fp32 weights): the planned peaks vs
    the process's peak RSS above its start, in a fresh process, within 10%."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc (peak RSS reset)")
    path = model_dir(tmp_path, vocab_size=32768, hidden_size=1024, intermediate_size=1024, num_local_experts=16,
                     num_attention_heads=16, num_key_value_heads=4, head_dim=64)  # fmt: skip
    args = [f"model.path={path}", "model.dtype=float32", *STEP]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}  # big tensors: mmap, returned
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True)  # fmt: skip
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    planned = Planner(load_config(None, args)).plan(prompt_tokens=64)
    assert planned.train_peak_gib > 0.8
    assert rss["train"] == pytest.approx(planned.train_peak_gib, rel=0.10)
    assert rss["rollout"] == pytest.approx(planned.rollout_peak_gib, rel=0.10)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "goal_gib"), [
    ("gsm8k_20b_16gb.yaml", 13.0), ("gsm8k_120b.yaml", 76.0), ("long_context_20b.yaml", 76.0),
])  # fmt: skip
def test_recipes_meet_their_memory_goals(recipe, goal_gib):
    result = plan(load_config(ROOT / "configs" / recipe), None)
    assert result.peak_gib <= goal_gib, (recipe, result.rollout_peak_gib, result.train_peak_gib)
