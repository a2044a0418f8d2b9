"""Router replay (R3): the engine records, for every position it fed to the model (prefill, decode, tool-result
append), the experts each MoE layer chose (``RolloutBatch.token_fields["routes"]`` [T, layers, k], -1 where a position
was never fed: the last token of a sequence); a training forward given those routes uses exactly those experts, with
gates from the current router logits, and ``router/route_mismatch_frac`` counts how often its own router differs."""

from __future__ import annotations

import copy

import pytest
import torch
from rollout_helpers import prompts

import ossrl
from ossrl.config import load_config
from ossrl.model import gpt_oss
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.train import update as update_module
from ossrl.train.trainer import Trainer
from ossrl.train.update import route_mismatch

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=[], seed=1)


def own_routes(model, batch, **kwargs) -> torch.Tensor:
    """The experts a packed forward over the batch chooses, [T, layers, k]."""
    log = [None] * model.config.num_hidden_layers
    with torch.no_grad():
        model.hidden_states(batch.tokens, cu_seqlens=batch.cu_seqlens, route_log=log, **kwargs)
    return torch.stack(log, 1)


def test_the_engine_records_the_experts_of_every_position_it_fed(tiny):
    model, tokenizer = tiny
    requests = [Request(p, n=2) for p in prompts(3)]
    with ossrl.deterministic():
        batch = Engine(model, tokenizer, kv_cache_tokens=2048, max_num_seqs=3).rollout(requests, SAMPLING)
        routes = batch.token_fields["routes"]
        config = model.config
        assert routes.shape == (batch.tokens.numel(), config.num_hidden_layers, config.num_experts_per_tok)
        assert routes.dtype == torch.int16
        fed = (routes >= 0).all(-1).all(-1)
        assert not fed[batch.cu_seqlens[1:].long() - 1].any()  # a sequence's last token is never fed
        assert int(fed.sum()) == batch.tokens.numel() - batch.num_seqs
        # what the trainer's forward chooses at each fed position, bitwise in deterministic mode
        assert torch.equal(own_routes(model, batch)[fed], routes[fed].long())
        # the fixed-buffer decode step (cuda_graphs; uncaptured on CPU) records the same
        fixed = Engine(model, tokenizer, kv_cache_tokens=2048, max_num_seqs=3, cuda_graphs=True)
        assert torch.equal(fixed.rollout(requests, SAMPLING).token_fields["routes"], routes)
    fast = Engine(model, tokenizer, kv_cache_tokens=2048).rollout(requests, SAMPLING)  # fast mode: recorded too
    fed = (fast.token_fields["routes"] >= 0).all(-1).all(-1)
    same = (own_routes(model, fast)[fed] == fast.token_fields["routes"][fed].long()).all(-1)
    assert same.float().mean() > 0.95  # fp32 rounding flips an expert now and then
    stream = Engine(model, tokenizer, kv_cache_tokens=2048, record_routes=False).rollout(requests, SAMPLING)
    assert "routes" not in stream.token_fields


def test_replay_uses_the_recorded_experts_after_the_router_moved(tiny, monkeypatch):
    model, tokenizer = tiny
    batch = Engine(model, tokenizer, kv_cache_tokens=2048).rollout([Request(p, n=2) for p in prompts(3)], SAMPLING)
    routes = batch.token_fields["routes"]
    fed = (routes >= 0).all(-1)  # [T, layers]
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an update's worth of change in every router
        for layer in moved.model.layers:
            w = layer.mlp.router.weight
            w.add_(torch.randn(w.shape, generator=gen) * 0.2 * w.std())
    used = []
    original = gpt_oss.moe_experts

    def spy(x, expert_ids, *args, **kwargs):
        used.append(expert_ids.clone())
        return original(x, expert_ids, *args, **kwargs)

    monkeypatch.setattr(gpt_oss, "moe_experts", spy)
    chosen = own_routes(moved, batch)
    frac, pairs = route_mismatch(list(chosen.unbind(1)), routes)
    assert pairs == int(fed.sum()) and 0 < frac < 0.5  # without replay, some experts differ
    assert not torch.equal(torch.stack(used, 1)[fed], routes.long()[fed])
    used.clear()
    replayed = own_routes(moved, batch, routes=routes)
    experts = torch.stack(used, 1)
    assert torch.equal(experts[fed], routes.long()[fed])  # with replay: exactly the recorded experts
    assert torch.equal(experts[~fed], replayed[~fed])  # never fed (-1): the router's own choice
    # the gates come from the current router logits of the replayed experts: the router still gets a gradient
    router = moved.model.layers[2].mlp.router
    router.weight.requires_grad_(True)
    moved.hidden_states(batch.tokens, cu_seqlens=batch.cu_seqlens, routes=routes).pow(2).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="routes must be"):
        moved.hidden_states(batch.tokens, cu_seqlens=batch.cu_seqlens, routes=routes[:, :1])


BASE = [
    "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=6", "rollout.max_turns=1",
    "rollout.kv_cache_tokens=2048", "model.dtype=float32", "logging.progress=false",
    "task.options={system_message: false}", "lora.r=4", "lora.targets=[q_proj, router]",
]  # fmt: skip


@pytest.mark.parametrize("replay", [False, True])
def test_the_trainer_replays_routes_and_reports_how_often_they_differ(monkeypatch, replay):
    given = []
    original = update_module.packed_logprobs

    def spy(model, *args, routes=None, route_log=None, **kwargs):
        given.append(routes is not None)
        return original(model, *args, routes=routes, route_log=route_log, **kwargs)

    monkeypatch.setattr(update_module, "packed_logprobs", spy)
    options = [
        f"algorithm.router_replay={str(replay).lower()}",
        "algorithm.updates_per_batch=2",
        "algorithm.kl_coef=0.1",
    ]
    metrics = Trainer(load_config(None, [*BASE, *options])).train_step()
    assert 0.0 <= metrics["router/route_mismatch_frac"] <= 1.0
    assert given and all(g == replay for g in given)  # old, reference and loss forwards alike


class ReplayedGraph:
    """A captured decode graph's contract on CPU: a replay reruns the step and writes every output into the tensors
    the capture returned (tokens, log-probs, and the route tensors the step's layers wrote), which stay put."""

    def __init__(self, step, run) -> None:
        self.step, self.run = step, run
        self.tokens, self.logprobs = run(step)
        self.routes = list(step.route_log)

    def replay(self) -> None:
        untouched = list(self.step.route_log)  # a real replay never touches Python objects
        tokens, logprobs = self.run(self.step)
        self.tokens.copy_(tokens)
        self.logprobs.copy_(logprobs)
        for kept, new in zip(self.routes, self.step.route_log, strict=True):
            kept.copy_(new)
        self.step.route_log[:] = untouched


def test_a_replayed_decode_graph_records_the_routes_it_computed(tiny, monkeypatch):
    """Decode graphs of one bucket share their step's buffers across sampling params: each graph's routes are the
    tensors its own capture wrote, whatever another graph of the bucket ran since (capture simulated on CPU)."""
    from ossrl.rollout import graphs

    model, tokenizer = tiny
    requests = [Request(p) for p in prompts(3)]
    first, second = SAMPLING, SamplingParams(temperature=0.7, max_new_tokens=8, stop_token_ids=[], seed=2)
    want = Engine(model, tokenizer, kv_cache_tokens=1024, page_size=4, max_num_seqs=3, cuda_graphs=True)
    want = [want.rollout(requests, s).token_fields["routes"] for s in (first, second, first)]
    init = graphs.DecodeGraphs.__init__
    monkeypatch.setattr(graphs.DecodeGraphs, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "capture": True}))
    monkeypatch.setattr(graphs.DecodeGraphs, "_warm_up", lambda self, step, run: run(step))

    def record(self, step, run):
        graph = ReplayedGraph(step, run)
        return graph, graph.tokens, graph.logprobs

    monkeypatch.setattr(graphs.DecodeGraphs, "_record", record)
    engine = Engine(model, tokenizer, kv_cache_tokens=1024, page_size=4, max_num_seqs=3, cuda_graphs=True)
    got = [engine.rollout(requests, s).token_fields["routes"] for s in (first, second, first)]
    assert engine.stats["graph_captures"] == 2 and engine.graph_buckets == {3: True}
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
