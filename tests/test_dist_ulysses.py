"""Ulysses sequence parallelism (``ossrl.dist.ulysses``): 2 gloo processes on CPU against the one-process model.

The torchrun worker is this file's ``__main__``: one launch runs every distributed check and writes each rank's
measured differences; the pytest side asserts on them (and on the worker's exit status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ossrl.dist.ulysses import shard_batch

TOL = 1e-5
LENGTHS = [45, 7, 70, 1, 20]  # 143 tokens: one padding token at sp=2; the shard border (72) falls 20 tokens into the
# 70-token sequence, inside the 32-token window of the tiny model's sliding layers


def test_shard_batch_pads_with_a_sequence_of_its_own():
    ids = torch.arange(1, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    first, second = (shard_batch(ids, cu, rank=r, size=2) for r in (0, 1))
    assert first.input_ids.tolist() == [1, 2, 3, 4] and second.input_ids.tolist() == [5, 6, 7, 0]
    assert first.position_ids.tolist() == [0, 1, 2, 0] and second.position_ids.tolist() == [1, 2, 3, 0]
    assert second.cu_seqlens.tolist() == [0, 3, 7, 8] and second.max_seqlen == 4
    assert (second.start, second.stop, second.total, second.padded) == (4, 8, 7, 8)
    routes = torch.arange(14).view(7, 2)
    assert second.local(routes, fill=-1).tolist() == [[8, 9], [10, 11], [12, 13], [-1, -1]]
    even = shard_batch(ids[:6], torch.tensor([0, 6], dtype=torch.int32), rank=1, size=3)
    assert even.input_ids.tolist() == [3, 4] and even.cu_seqlens.tolist() == [0, 6]
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        shard_batch(ids, cu, rank=2, size=2)
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to T=7"):
        shard_batch(ids, torch.tensor([0, 3], dtype=torch.int32), rank=0, size=2)


def test_two_ranks_match_one_process(tmp_path):
    """Forward (hidden states, log-probs, entropies) and every gradient, sinks included, with and without gradient
    checkpointing, a rank without targets, router replay + route log, and sp not dividing the kv heads."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["bad_heads"], result  # sp=2 over 1 kv head: a clear error naming the field
        for case, diffs in result["cases"].items():
            assert diffs["params_with_grad"] == diffs["reference_params_with_grad"], (case, diffs)
            for name, value in diffs.items():
                if name.startswith("max_"):
                    assert value <= TOL, (rank, case, name, value)
            assert diffs["sinks_grad_norm"] > 1e-3, (case, diffs)  # the sink gradient is really there
            assert diffs["partial_before_all_reduce"] > 1e-3, (case, diffs)  # a rank's own gradient is a part
        assert result["route_log_equal"], result
        for name, value in result["forward"].items():
            assert value <= TOL, (rank, name, value)


# ---- the torchrun worker -----------------------------------------------------------------------------------------
def _worker(out_dir: Path) -> None:
    import copy
    from datetime import timedelta

    import torch.distributed as dist

    from ossrl.dist.mesh import MeshError
    from ossrl.dist.ulysses import apply_ulysses, sp_all_reduce_grads
    from ossrl.model.gpt_oss import GptOss
    from ossrl.model.tiny import tiny_config
    from ossrl.train.logprobs import packed_logprobs

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, group = dist.get_rank(), dist.group.WORLD
    torch.manual_seed(0)
    config = tiny_config(96)
    reference = GptOss.from_config(config, dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # sinks and weights large enough that attention, and the sink gradient, are far from flat
        for name, p in reference.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
    model = apply_ulysses(copy.deepcopy(reference), group)

    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    tokens = torch.randint(0, config.vocab_size, (total,), generator=gen)
    starts = torch.zeros(total, dtype=torch.bool)
    starts[cu[:-1].long()] = True
    targets = (torch.rand(total, generator=gen) < 0.6) & ~starts
    first_only = targets.clone()
    first_only[LENGTHS[0] :] = False  # every predicting position on rank 0: rank 1 has no target of its own

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        """max |a - b|, relative to max |a| where that is above 1 (fp32 sums in another order)"""
        return float((a - b).abs().max() / a.abs().max().clamp_min(1.0)) if a.numel() else 0.0

    cases = {}
    for case, mask, checkpointing in [("plain", targets, False), ("checkpointed", targets, True),
                                      ("no_targets_on_rank1", first_only, False)]:  # fmt: skip
        for m in (reference, model):
            m.zero_grad(set_to_none=True)
            m.gradient_checkpointing = checkpointing
        weights = torch.randn(int(mask.sum()), 2, generator=gen)
        out = {}
        for m, key in ((reference, "ref"), (model, "sp")):
            lp, ent = packed_logprobs(m, tokens, cu, mask, temperature=0.7, chunk_size=16)
            (lp * weights[:, 0] + ent * weights[:, 1]).sum().backward()
            out[key] = (lp.detach(), ent.detach())
        partial = max(diff(p.grad, q.grad) for p, q in zip(reference.parameters(), model.parameters(), strict=True)
                      if p.grad is not None and q.grad is not None)  # fmt: skip
        sp_all_reduce_grads(model, group)
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        sp_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        diffs = {
            "max_logprobs": diff(out["ref"][0], out["sp"][0]),
            "max_entropy": diff(out["ref"][1], out["sp"][1]),
            "max_grad": max(diff(ref_grads[n], sp_grads[n]) for n in ref_grads if n in sp_grads),
            "max_sinks_grad": max(diff(ref_grads[n], sp_grads[n]) for n in ref_grads if n.endswith("sinks")),
            "params_with_grad": sorted(sp_grads),
            "reference_params_with_grad": sorted(ref_grads),
            "partial_before_all_reduce": partial,
            "sinks_grad_norm": float(sum(g.norm() for n, g in ref_grads.items() if n.endswith("sinks"))),
        }
        cases[case] = diffs

    with torch.no_grad():  # forward: the shard's final hidden states are the one-process model's rows
        shard = shard_batch(tokens, cu, rank=rank, size=2)
        full = reference.hidden_states(tokens, cu_seqlens=cu)
        mine = model.hidden_states(shard.input_ids, shard=shard)
        start, stop = shard.start, min(shard.stop, total)
        mine = mine[: stop - start]  # without the padding row
        forward = {"max_hidden": diff(full[start:stop], mine),
                   "max_logits": diff(reference.lm_head(full[start:stop]), model.lm_head(mine))}  # fmt: skip

        # router replay (some rows replayed, some the router's own) and the route log, gathered to [T, k]
        k, layers, experts = config.num_experts_per_tok, config.num_hidden_layers, config.num_local_experts
        routes = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(total * layers)])
        routes = routes.view(total, layers, k)
        routes[torch.rand(total, generator=gen) < 0.5] = -1
        logs = {key: [None] * layers for key in ("ref", "sp")}
        lp_ref, _ = packed_logprobs(reference, tokens, cu, targets, routes=routes, route_log=logs["ref"])
        lp_sp, _ = packed_logprobs(model, tokens, cu, targets, routes=routes, route_log=logs["sp"])
        forward["max_replay_logprobs"] = diff(lp_ref, lp_sp)
        route_log_equal = all(torch.equal(a, b) for a, b in zip(logs["ref"], logs["sp"], strict=True))

    bad_heads = False
    try:
        apply_ulysses(GptOss.from_config(tiny_config(96, num_key_value_heads=1), dtype=torch.float32), group)
    except MeshError as err:
        bad_heads = "num_key_value_heads=1" in str(err) and "parallel.sp=2" in str(err)
    result = {"cases": cases, "forward": forward, "bad_heads": bad_heads, "route_log_equal": route_log_equal}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
