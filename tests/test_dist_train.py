"""Multi-process training on CPU (gloo, 2 processes, the tiny model): the same run as one process, and bad input
(a mesh that does not fit, mismatched configs, a rank that dies or hangs) failing on every rank instead of hanging.

Runs ``torchrun -m ossrl train`` (or two plain processes with torchrun's environment, where a test makes one rank
misbehave) in subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ossrl.config import ConfigError, ParallelSettings, load_config
from ossrl.dist.mesh import MeshError, check_heads, mesh_shape

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "configs/tiny_cpu.yaml", "steps=3", "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=24",
    "rollout.max_turns=2", "task.eval_limit=2", "checkpoint.every=0", "logging.progress=false", "logging.report_to=[]",
    "optim.lr=1e-2", "lora.targets=[q_proj, v_proj, gate_up_proj]", "task.options.system_message=false",
]  # fmt: skip
# A short supervised warm start, so that rewards (and so advantages and gradients) are not all zero.
WARM = ["warmup.steps=40", "warmup.tool_first_steps=0", "warmup.examples=200", "warmup.batch_size=16"]
EXACT = ("reward/", "accuracy", "response_length", "tool_calls_per_episode", "finish_length_frac", "groups_kept",
         "rollout_errors", "lr", "skipped")  # fmt: skip
TIMING = ("time", "tokens_per_s", "seconds", "peak_memory")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    port = _free_port()
    rdzv = ["--rdzv-backend", "c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]  # --standalone, on a port of our own
    return _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc), *rdzv,
                 "-m", "ossrl", "train", *args])  # fmt: skip


def _ranks(per_rank_args: list[list[str]], script: str | None = None) -> list[subprocess.Popen]:
    """Two processes with torchrun's environment (no torchrun agent: it would stop the others itself)."""
    port, procs = _free_port(), []
    for rank, args in enumerate(per_rank_args):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(len(per_rank_args)))  # fmt: skip
        cmd = [sys.executable, script, *args] if script else [sys.executable, "-m", "ossrl", "train", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    return procs


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _same_run(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    assert any(r["grad_norm"] > 0 for r in one), "the recipe trains nothing: the comparison would prove nothing"
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for key in a:
            if key.startswith(EXACT):
                assert a[key] == b[key], (a["step"], key)
            elif key.startswith("mismatch/"):  # sampler vs trainer: both ~1e-7, sums in another order
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
            else:  # losses, grad norm, entropy, clip fractions: the same sums, reduced across ranks
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"warmup.cache_dir={tmp_path_factory.mktemp('warm')}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache) -> Path:
    """The reference: the LoRA recipe in one plain process (it also fills the warm-start cache)."""
    run_dir = tmp_path_factory.mktemp("one")
    out = _run([sys.executable, "-m", "ossrl", "train", *TINY, *WARM, cache, f"logging.run_dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "checkpoint-000003" / "adapter" / "adapter_model.safetensors")


def test_two_processes_train_like_one_lora(tmp_path, cache, one_process):
    two = _torchrun([*TINY, *WARM, cache, f"logging.run_dir={tmp_path}", "parallel.timeout_s=120"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    _same_run(_metrics(one_process), _metrics(tmp_path))
    samples = [(d / "samples.jsonl").read_text() for d in (one_process, tmp_path)]
    assert samples[0] == samples[1]  # rank 0 writes the step's first sequences, gathered from the ranks
    expected, got = _adapter(one_process), _adapter(tmp_path)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-4, msg=name)
    assert "eval_after" in json.loads((tmp_path / "summary.json").read_text())  # rank 0 wrote the run's files


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hsdp", "sp", "one_rank"])
def test_hsdp_sequence_parallel_and_one_rank_runs_train_like_one_process(tmp_path, cache, one_process, layout):
    mesh = {"hsdp": ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
            "sp": ["parallel.sp=2", "parallel.dp_shard=1"], "one_rank": []}[layout]  # fmt: skip
    args = [*TINY, *WARM, cache, *mesh, f"logging.run_dir={tmp_path}", "parallel.timeout_s=120"]
    two = _torchrun(args, nproc=1 if layout == "one_rank" else 2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    _same_run(_metrics(one_process), _metrics(tmp_path))


def _one_and_two(tmp_path: Path, args: list[str], mesh: list[str]) -> None:
    one = _run([sys.executable, "-m", "ossrl", "train", *args, f"logging.run_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun([*args, *mesh, f"logging.run_dir={tmp_path / 'two'}", "parallel.timeout_s=120"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    _same_run(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"))


def test_two_processes_full_finetuning_like_one(tmp_path, cache):  # the must-show: in the default suite
    _one_and_two(tmp_path, [*TINY, *WARM, cache, "lora.enabled=false", "optim.lr=1e-4"], ["parallel.dp_shard=2"])


@pytest.mark.slow
def test_two_processes_with_refills_kl_two_updates_and_batch_scale_like_one(tmp_path, cache):
    """The options whose collectives differ between ranks: dynamic sampling's refills (global kept counts), the KL
    reference forward and old log-probs (extra FSDP passes, fillers on the rank with fewer micro-batches: 200-token
    micro-batches), the batch-std advantage scale (global rewards)."""
    options = ["algorithm.updates_per_batch=2", "algorithm.kl_coef=0.01", "algorithm.dynamic_sampling=true",
               "algorithm.scale=batch", "optim.micro_batch_tokens=200"]  # fmt: skip
    _one_and_two(tmp_path, [*TINY, *WARM, cache, *options], [])


def test_parallel_settings_are_validated():
    assert load_config(None, []).parallel == ParallelSettings(dp_replicate=1, dp_shard=-1, sp=1, timeout_s=300.0)
    with pytest.raises(ConfigError, match="parallel.sp: must be >= 1 or -1"):
        load_config(None, ["parallel.sp=0"])
    with pytest.raises(ConfigError, match="at most one of dp_replicate, dp_shard, sp may be -1"):
        load_config(None, ["parallel.sp=-1"])
    with pytest.raises(ConfigError, match="parallel.timeout_s: must be a finite number"):
        load_config(None, ["parallel.timeout_s=0"])


def test_mesh_shapes_and_their_errors():
    assert mesh_shape(ParallelSettings(), 8) == {"dp_replicate": 1, "dp_shard": 8, "sp": 1}
    assert mesh_shape(ParallelSettings(dp_replicate=2, sp=2), 8) == {"dp_replicate": 2, "dp_shard": 2, "sp": 2}
    with pytest.raises(MeshError, match="dp_shard=3.*mesh of 3 processes but the run has 2"):
        mesh_shape(ParallelSettings(dp_shard=3), 2)
    with pytest.raises(MeshError, match="fixed dims' product 3 does not divide the world size"):
        mesh_shape(ParallelSettings(sp=3), 8)
    config = type("C", (), {"num_attention_heads": 8, "num_key_value_heads": 2})
    check_heads(2, config)
    with pytest.raises(MeshError, match="parallel.sp=4 does not divide the model's num_key_value_heads=2"):
        check_heads(4, config)


@pytest.mark.slow
def test_a_mesh_that_does_not_fit_fails_on_every_rank(tmp_path):
    out = _torchrun([*TINY, "warmup.steps=0", "parallel.dp_shard=3", f"logging.run_dir={tmp_path}"])
    assert out.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] parallel: dp_replicate=1, dp_shard=3, sp=1 is a mesh of 3 processes" in out.stderr


@pytest.mark.slow
def test_mismatched_configs_fail_on_every_rank(tmp_path):
    base = [*TINY, "warmup.steps=0", f"logging.run_dir={tmp_path}"]
    procs = _ranks([[*base, "optim.lr=1e-2"], [*base, "optim.lr=2e-2"]])
    for rank, proc in enumerate(procs):
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 1, text[-3000:]
        assert (
            f"[rank {rank}] the ranks were started with different configs (rank 0 vs rank 1 differ in optim.lr)" in text
        )
    assert not (tmp_path / "metrics.jsonl").exists()


# Rank 1 misbehaves at the start of step 2: ``die`` exits at once, ``hang`` sleeps (a stuck GPU, a deadlock).
MISBEHAVE = textwrap.dedent("""
    import os, sys, time
    from ossrl.train import trainer
    step = trainer.Trainer.train_step
    def train_step(self):
        if self.step == 1 and os.environ["RANK"] == "1":
            if os.environ["MODE"] == "die":
                os._exit(3)
            time.sleep(3600)
        return step(self)
    trainer.Trainer.train_step = train_step
    from ossrl.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_rank_that_dies_or_hangs_stops_the_run_with_an_error(tmp_path, mode, monkeypatch):
    script = tmp_path / "misbehave.py"
    script.write_text(MISBEHAVE)
    monkeypatch.setenv("MODE", mode)
    # "die": the peer's closed connection ends the wait, not the timeout. "hang": 20 s, not less: on a loaded machine
    # the startup's own waits (rank 0 builds the tiny checkpoint first) took over 5 s and aborted elsewhere.
    timeout = 900 if mode == "die" else 20
    args = [*TINY, "warmup.steps=0", f"logging.run_dir={tmp_path / 'run'}", f"parallel.timeout_s={timeout}"]
    rank0, rank1 = _ranks([args, args], script=str(script))
    try:
        text, _ = rank0.communicate(timeout=600)
    finally:
        if mode == "hang":
            rank1.kill()
        rank1.communicate(timeout=600)
    assert rank0.returncode == 1, text[-3000:]
    assert "[rank 0] a collective with the other ranks failed" in text
    assert ("Connection closed by peer" if mode == "die" else "Timed out") in text
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
