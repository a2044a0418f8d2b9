"""Runs that never lose or mix up work: run ids, an earlier run moved aside, atomic checksummed checkpoints, a
resume that skips what is incomplete, corrupt or another run's, a full disk and non-finite parameters stopping with
one line while the last good checkpoint stays, and settings the model cannot take refused before its weights load."""

from __future__ import annotations

import json

import pytest
import torch

from ossrl.cli import main
from ossrl.config import ConfigError, load_config
from ossrl.train import state as state_module
from ossrl.train.state import checkpoint_dirs, verify_checkpoint

RUN = [
    "steps=2", "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4",
    "rollout.max_turns=1", "rollout.kv_cache_tokens=2048", "task.eval_limit=2", "checkpoint.every=1",
    "model.dtype=float32", "model.gradient_checkpointing=false", "logging.progress=false", "logging.report_to=[]",
    "task.options={system_message: false}",
]  # fmt: skip


def train(run_dir, *extra: str) -> int:
    return main(["train", *RUN, f"logging.run_dir={run_dir}", *extra])


def run_id(run_dir) -> str:
    return json.loads((run_dir / "run.json").read_text())["run_id"]


def events(run_dir) -> str:
    return (run_dir / "events.log").read_text()


def test_a_fresh_run_moves_an_earlier_run_aside_and_never_reports_its_adapter(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir) == 0
    first = run_id(run_dir)
    assert train(run_dir, "steps=1") == 0  # a new run with fewer steps in the same directory
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(archived) == 1 and run_id(archived[0]) == first and run_id(run_dir) != first
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["checkpoint-000001"]  # not the old run's step 2
    assert "held an earlier run: moved it to" in events(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["extra"]["final_checkpoint"].endswith("checkpoint-000001")


def test_a_run_that_cannot_start_leaves_the_earlier_run_in_place(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, "steps=1") == 0
    first = run_id(run_dir)
    assert train(run_dir, "task.name=dataset", "task.options={path: missing.jsonl, rewards: [nowhere:fn]}") == 1
    assert "ossrl train:" in capsys.readouterr().err
    assert run_id(run_dir) == first and not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_checkpoints_are_atomic_checksummed_and_a_resume_skips_bad_ones(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir) == 0
    good = checkpoint_dirs(run_dir)
    assert [p.name for p in good] == ["checkpoint-000001", "checkpoint-000002"]
    assert all(verify_checkpoint(p, run_id(run_dir)) is None for p in good)
    # step 2's optimizer state is truncated; a kill left a partial step 3; another run's checkpoint sneaked in
    state = good[1] / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    (run_dir / "checkpoints" / "checkpoint-000003.partial").mkdir()
    assert "does not match its checksum" in verify_checkpoint(good[1], run_id(run_dir))
    assert "another run" in verify_checkpoint(good[0], "someone-else")
    assert train(run_dir, "steps=3", "checkpoint.resume=true") == 0
    log = events(run_dir)
    assert "skipped checkpoint checkpoint-000003.partial (interrupted" in log
    assert "skipped checkpoint checkpoint-000002 (trainer_state.pt does not match" in log
    assert "resumed from" in log and "checkpoint-000001 at step 1" in log
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert verify_checkpoint(run_dir / "checkpoints" / "checkpoint-000003", run_id(run_dir)) is None


def test_a_kill_during_the_first_checkpoint_resumes_from_step_zero(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = torch.save

    def killed(obj, path, *args, **kwargs):
        original(obj, path, *args, **kwargs)
        raise KeyboardInterrupt("killed while writing the checkpoint")

    monkeypatch.setattr(state_module.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(run_dir)
    monkeypatch.setattr(state_module.torch, "save", original)
    assert checkpoint_dirs(run_dir) == []  # nothing half-written passes for a checkpoint
    assert train(run_dir, "checkpoint.resume=true") == 0
    assert "no complete checkpoint; starting from step 0" in events(run_dir)
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["checkpoint-000001", "checkpoint-000002"]


def test_a_full_disk_is_one_line_and_the_last_good_checkpoint_stays(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    original, calls = torch.save, []

    def disk_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: "
                               "No space left on device")  # fmt: skip
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(state_module.torch, "save", disk_full)
    assert train(run_dir) == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "No space left on device" in err and "Traceback" not in err
    (good,) = checkpoint_dirs(run_dir)
    assert good.name == "checkpoint-000001" and verify_checkpoint(good, run_id(run_dir)) is None
    assert not list((run_dir / "checkpoints").glob("*.partial"))


def test_non_finite_parameters_stop_the_run_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from ossrl.train import trainer as trainer_module

    original = torch.optim.AdamW.step
    steps = []

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(trainer_module.torch.optim.AdamW, "step", poisoned)
    assert train(tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "an update at step 2 left non-finite parameters" in err
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["checkpoint-000001"]


def test_settings_the_model_cannot_take_fail_before_its_weights_load(tmp_path, capsys, monkeypatch):
    from ossrl.model import GptOss

    loads = []
    monkeypatch.setattr(GptOss, "from_pretrained", lambda *a, **k: loads.append(1))
    assert train(tmp_path / "r1", "lora.r=100000") == 1
    assert "lora.r=100000 is larger than the smallest adapted matrix side" in capsys.readouterr().err
    assert loads == []
    with pytest.raises(ConfigError, match=r"rollout.n: must be <= rollout.max_num_seqs=256"):
        load_config(None, ["rollout.n=100000"])
    with pytest.raises(ConfigError, match="optim.lr: must be a finite number"):
        load_config(None, ["optim.lr=.inf"])


@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"top_p": float("nan")}, {"temperature": 1e400},
                                 {"max_new_tokens": 2.5}, {"tool_timeout_s": 0}])  # fmt: skip
def test_sampling_params_reject_non_finite_values(tiny, bad):
    from ossrl.rollout import Engine, Request, SamplingParams

    model, tokenizer = tiny
    with pytest.raises(ValueError, match="SamplingParams"):
        Engine(model, tokenizer, kv_cache_tokens=256).generate([Request([1, 2, 3])], SamplingParams(**bad))


def test_a_bad_byte_or_line_in_a_dataset_names_the_file_and_the_line(tmp_path):
    from ossrl.tasks.data import BadRow, read_local

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9"}\n{bad json\n')
    rows = read_local(path)
    assert rows[0] == {"question": "q", "answer": "#### 1"}
    assert isinstance(rows[1], BadRow) and str(rows[1]) == "not valid UTF-8 (byte 0xe9, column 18) at line 2"
    assert isinstance(rows[2], BadRow) and str(rows[2]).startswith("invalid JSON (") and "at line 3" in str(rows[2])
    broken = tmp_path / "d.json"
    broken.write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(ValueError, match=rf"{broken} line 2: invalid JSON"):
        read_local(broken)


def test_a_truncated_checkpoint_shard_is_named(tmp_path):
    from ossrl.model import GptOss
    from ossrl.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "tiny")
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{shard}: cannot read this safetensors file .* truncated or corrupt"):
        GptOss.from_pretrained(path, dtype=torch.float32)


def test_the_config_opts_the_tasks_sandbox_into_running_unisolated(monkeypatch):
    from ossrl.sandbox.runner import ALLOW_ENV
    from ossrl.train.trainer import Trainer

    monkeypatch.setenv(ALLOW_ENV, "")  # recorded, so the variable is restored (absent) after the test
    monkeypatch.delenv(ALLOW_ENV)
    Trainer(load_config(None, RUN))
    assert ALLOW_ENV not in __import__("os").environ  # off by default: an unisolated sandbox refuses to run
    Trainer(load_config(None, [*RUN, "allow_unisolated_sandbox=true"]))
    assert __import__("os").environ[ALLOW_ENV] == "1"
