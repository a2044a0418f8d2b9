"""Multi-process checkpoints (torch.distributed.checkpoint): 2 gloo processes save FSDP2-sharded LoRA and full
fine-tuning state, one process without a process group loads it exactly; a one-process checkpoint loads into 2
processes; a save that fails on one rank leaves the previous checkpoint the last good one; and a checkpoint of a
2-process ``torchrun -m ossrl train`` run resumes in one process and continues the run.

Run as a script under torchrun, this file is the worker (``main``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).parents[1]
LORA_TARGETS = ("q_proj", "v_proj", "gate_up_proj")


def _model(seed: int = 0):
    from ossrl.model import GptOss
    from ossrl.model.tiny import tiny_config

    torch.manual_seed(seed)
    return GptOss(tiny_config(vocab_size=64, num_hidden_layers=2)).float()


def _trainer(lora: bool, *, dist=None):
    """What ``save_training_state`` / ``load_training_state`` read of a Trainer, on a tiny model (the engine's plain
    model made before sharding, as ``Trainer._distribute`` does)."""
    from ossrl.config import load_config
    from ossrl.model.lora import LoraConfig, apply_lora, lora_parameters

    model = _model()
    if lora:
        apply_lora(model, LoraConfig(r=4, targets=LORA_TARGETS), generator=torch.Generator().manual_seed(1))
    config = load_config(
        None, [f"lora.enabled={str(lora).lower()}", "lora.r=4", f"lora.targets=[{', '.join(LORA_TARGETS)}]"]
    )
    engine = None
    if dist is not None:
        from torch.distributed.device_mesh import init_device_mesh

        from ossrl.dist.fsdp import apply_fsdp
        from ossrl.dist.sync import engine_model, materialize, sync_weights

        engine = _Engine(engine_model(model, lora=lora))
        apply_fsdp(model, init_device_mesh("cpu", (dist.world_size,)), lora=lora)
        materialize(engine.model, torch.device("cpu"))  # full fine-tuning: allocated once the trainer's are sharded
        sync_weights(model, engine, lora=lora)
    params = lora_parameters(model) if lora else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return SimpleNamespace(config=config, model=model, device=torch.device("cpu"), optimizer=optimizer,
                           scheduler=scheduler, step=0, position=0, base_model_name="tiny", dist=dist, engine=engine,
                           params=params)  # fmt: skip


class _Engine:
    """The engine's weight-sync boundary, without the engine."""

    def __init__(self, model) -> None:
        self.model = model

    def update_weights(self, named=None) -> int:
        targets = dict(self.model.named_parameters())
        pairs = list(named or [])
        with torch.no_grad():
            for name, tensor in pairs:
                targets[name].copy_(tensor)
        return len(pairs)


def _train(trainer, steps: int, rank: int = 0) -> None:
    """A few AdamW steps on rank-dependent data (so the shards' optimizer state differs)."""
    for step in range(steps):
        ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(100 * rank + step))
        trainer.model(ids).float().pow(2).mean().backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scheduler.step()
        trainer.step += 1
        trainer.position += 4
    if trainer.dist is not None:
        from ossrl.dist.sync import sync_weights

        sync_weights(trainer.model, trainer.engine, lora=trainer.config.lora.enabled)


def _full_state(trainer) -> dict:
    """Trained parameters and optimizer state as full tensors by name (a collective under torchrun)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from ossrl.dist.checkpoint import trainable_names

    full = trainer.dist is not None
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer,
                                        options=StateDictOptions(full_state_dict=full, cpu_offload=full))  # fmt: skip
    names = trainable_names(trainer.model)
    if full and trainer.dist.rank != 0:
        return {}  # cpu_offload: rank 0 alone receives the full tensors
    return {"model": {k: v.clone() for k, v in model_sd.items() if k in names},
            "optim": {k: {n: t.clone() for n, t in s.items()} for k, s in optim_sd["state"].items()},
            "lr": trainer.scheduler.get_last_lr(), "step": trainer.step, "position": trainer.position}  # fmt: skip


def main(out: Path, mode: str = "all") -> None:
    """The torchrun worker (2 gloo processes); writes what the test compares under ``out``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter

    from ossrl.dist.launch import init_distributed
    from ossrl.train.state import CheckpointWriteError, load_training_state, save_training_state

    ctx = init_distributed("cpu", 60.0)
    rank = ctx.rank
    if mode == "die":
        _die_while_saving(ctx, out)
        return
    for lora in (True, False):
        trainer = _trainer(lora, dist=ctx)
        _train(trainer, 2, rank)
        save_training_state(trainer, out / ("lora" if lora else "full") / "checkpoint-000002", run_id="r")
        full = _full_state(trainer)
        if rank == 0:
            torch.save(full, out / f"expected_{'lora' if lora else 'full'}.pt")
    # a one-process checkpoint (written by the test) into 2 processes
    trainer = _trainer(True, dist=ctx)
    load_training_state(trainer, out / "single" / "checkpoint-000002")
    full = _full_state(trainer)
    if rank == 0:
        engine_ok = all(torch.equal(p, full["model"][n]) for n, p in trainer.engine.model.named_parameters()
                        if n in full["model"])  # fmt: skip
        torch.save({**full, "engine_synced": engine_ok}, out / "single_in_two.pt")
    # one rank fails to write its shard: every rank raises, the previous checkpoint stays the last good one
    trainer = _trainer(True, dist=ctx)
    _train(trainer, 1, rank)
    root = out / "failed" / "checkpoints"
    save_training_state(trainer, root / "checkpoint-000001", run_id="r")
    _train(trainer, 1, rank)
    if rank == 1:

        def disk_full(self, plan, planner):
            raise OSError(28, "No space left on device (test)")

        FileSystemWriter.write_data = disk_full
    try:
        save_training_state(trainer, root / "checkpoint-000002", run_id="r")
        outcome = "saved"
    except CheckpointWriteError as err:
        outcome = str(err)
    (out / f"failed_rank{rank}.txt").write_text(outcome)
    dist.barrier()
    dist.destroy_process_group()


def _die_while_saving(ctx, out: Path) -> None:
    """Rank 1's process ends in the middle of writing its shards of the second checkpoint: rank 0 must fail with
    a clear error (not hang), and the first checkpoint stays the last good one."""
    from torch.distributed.checkpoint import FileSystemWriter

    from ossrl.train.state import CheckpointWriteError, save_training_state

    trainer = _trainer(True, dist=ctx)
    root = out / "checkpoints"
    _train(trainer, 1, ctx.rank)
    save_training_state(trainer, root / "checkpoint-000001", run_id="r")
    _train(trainer, 1, ctx.rank)
    if ctx.rank == 1:
        FileSystemWriter.write_data = lambda self, plan, planner: os._exit(3)
    try:
        save_training_state(trainer, root / "checkpoint-000002", run_id="r")
        outcome = "saved"
    except CheckpointWriteError as err:
        outcome = str(err)
    (out / f"died_rank{ctx.rank}.txt").write_text(outcome)
    os._exit(0)  # the process group has a dead member: no orderly teardown


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a rendezvous port of our own (other torchrun tests may run at the same time)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv = ["--nnodes", "1", "--rdzv-backend", "c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    return _run([sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc-per-node", "2", *args])


def _assert_equal_state(got: dict, want: dict) -> None:
    assert set(got["model"]) == set(want["model"]) and got["model"]
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    assert set(got["optim"]) == set(want["optim"])
    for name, state in want["optim"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got["optim"][name][key]), torch.as_tensor(value)), (name, key)


def test_two_process_checkpoints_load_in_one_process_and_back(tmp_path):
    from safetensors.torch import load_file

    from ossrl.model.lora import peft_state_dict
    from ossrl.train.state import checkpoint_dirs, load_training_state, save_training_state, verify_checkpoint

    single = _trainer(True)
    _train(single, 2)
    save_training_state(single, tmp_path / "single" / "checkpoint-000002", run_id="r")
    want_single = _full_state(single)

    _torchrun(__file__, str(tmp_path))

    for kind in ("lora", "full"):
        ckpt = tmp_path / kind / "checkpoint-000002"
        assert verify_checkpoint(ckpt, "r") is None
        assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        trainer = _trainer(kind == "lora")  # one process, no process group
        load_training_state(trainer, ckpt)
        expected = torch.load(tmp_path / f"expected_{kind}.pt")
        got = _full_state(trainer)
        _assert_equal_state(got, expected)
        assert (got["step"], got["position"], got["lr"]) == (2, 8, expected["lr"])
        if kind == "lora":  # the export adapter, written by rank 0, holds the gathered adapters
            exported = load_file(ckpt / "adapter" / "adapter_model.safetensors")
            mine = peft_state_dict(trainer.model)
            assert set(exported) == set(mine) and all(torch.equal(exported[k], mine[k]) for k in mine)
        else:
            assert (ckpt / "model" / "config.json").is_file()
        _train(trainer, 1)  # and it trains on from there
        assert trainer.step == 3

    got = torch.load(tmp_path / "single_in_two.pt")
    _assert_equal_state(got, want_single)
    assert got["engine_synced"] and (got["step"], got["position"]) == (2, 8)

    failed = tmp_path / "failed"
    messages = [(tmp_path / f"failed_rank{r}.txt").read_text() for r in (0, 1)]
    assert all("rank 1 (OSError: [Errno 28] No space left on device" in m for m in messages), messages
    assert all("the earlier checkpoints are intact" in m for m in messages)
    assert [p.name for p in checkpoint_dirs(failed)] == ["checkpoint-000001"]
    assert verify_checkpoint(failed / "checkpoints" / "checkpoint-000001", "r") is None
    assert not (failed / "checkpoints" / "checkpoint-000002.partial").exists()


@pytest.mark.slow
def test_a_rank_that_dies_mid_save_leaves_the_previous_checkpoint_the_last_good_one(tmp_path):
    from ossrl.train.state import checkpoint_dirs, verify_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):  # plain processes with torchrun's environment: no agent to stop rank 0 when rank 1 dies
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path), "die"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 3], outputs
    message = (tmp_path / "died_rank0.txt").read_text()
    assert message.startswith("cannot write checkpoint") and "earlier checkpoints are intact" in message, message
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-000001"]
    assert verify_checkpoint(tmp_path / "checkpoints" / "checkpoint-000001", "r") is None
    assert not (tmp_path / "checkpoints" / "checkpoint-000002").exists()


TINY_RUN = [
    "configs/tiny_cpu.yaml", "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=24",
    "rollout.max_turns=2", "task.eval_limit=2", "checkpoint.every=1", "logging.progress=false", "logging.report_to=[]",
    "optim.lr=1e-2", "lora.targets=[q_proj, v_proj, gate_up_proj]", "task.options.system_message=false",
    "model.device=cpu", "parallel.timeout_s=120",
    # a short supervised warm start, so that rewards (and so gradients) are not all zero
    "warmup.steps=40", "warmup.tool_first_steps=0", "warmup.examples=200", "warmup.batch_size=16",
]  # fmt: skip
TIMING = ("time", "tokens_per_s", "seconds", "peak_memory")


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _same_step(want: dict, got: dict) -> None:
    assert set(want) == set(got)
    for key, value in want.items():  # rewards and counts exactly; sums reduced across ranks to 1e-4
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (want["step"], key)


def test_a_two_process_run_resumes_in_one_process_and_a_one_process_run_in_two(tmp_path):  # must-show: default suite
    from safetensors.torch import load_file

    from ossrl.train.state import checkpoint_dirs, verify_checkpoint

    common = [*TINY_RUN, f"warmup.cache_dir={tmp_path / 'warm'}"]
    ossrl = [sys.executable, "-m", "ossrl", "train"]
    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
    _run([*ossrl, *common, "steps=3", f"logging.run_dir={one}"])  # the reference (and it fills the warm-start cache)
    reference = _metrics(one)
    assert [r["step"] for r in reference] == [1, 2, 3] and reference[2]["grad_norm"] > 0

    _torchrun("-m", "ossrl", "train", *common, "steps=2", f"logging.run_dir={two}")
    assert [p.name for p in checkpoint_dirs(two)] == ["checkpoint-000001", "checkpoint-000002"]
    assert all((p / "dcp" / ".metadata").is_file() for p in checkpoint_dirs(two))
    _run([*ossrl, *common, "steps=3", "checkpoint.resume=true", f"logging.run_dir={two}"])
    resumed = _metrics(two)
    assert [r["step"] for r in resumed] == [1, 2, 3]  # step 3 ran in one process and was appended
    assert "checkpoint-000002 at step 2" in (two / "events.log").read_text()
    _same_step(reference[2], resumed[2])
    last = two / "checkpoints" / "checkpoint-000003"
    assert verify_checkpoint(last) is None and not (last / "dcp").exists()  # written as one process writes
    adapter = "adapter/adapter_model.safetensors"
    want, got = load_file(one / "checkpoints" / "checkpoint-000003" / adapter), load_file(last / adapter)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-4, msg=name)

    shutil.copytree(one, back)  # the one-process run as if it had stopped after step 2, resumed by 2 processes
    shutil.rmtree(back / "checkpoints" / "checkpoint-000003")
    _torchrun("-m", "ossrl", "train", *common, "steps=3", "checkpoint.resume=true", f"logging.run_dir={back}")
    continued = _metrics(back)
    assert [r["step"] for r in continued] == [1, 2, 3]
    _same_step(reference[2], continued[2])
    assert (back / "checkpoints" / "checkpoint-000003" / "dcp" / ".metadata").is_file()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
