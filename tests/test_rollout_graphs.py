"""CUDA-graph decode steps (``ossrl.rollout.graphs``): the fixed-buffer step samples what the plain step samples
(CPU, no capture), a step that can be captured never reads GPU values on the host (checked on CPU by watching every
op it dispatches), and on a GPU the replayed graphs give the same samples as the same steps run uncaptured."""

import copy
import logging

import pytest
import torch
from rollout_helpers import prompts, scripted_policy
from torch.utils._python_dispatch import TorchDispatchMode

from ossrl.harmony import Message, render_completion, render_conversation
from ossrl.model import GptOss
from ossrl.model.checkpoint import quantize_experts
from ossrl.model.lora import ALL_TARGETS, LoraConfig, apply_lora
from ossrl.rollout import Engine, Request, SamplingParams, graphs

aten = torch.ops.aten
# Ops that on CUDA wait for the GPU (their output shape or a Python value depends on GPU data) or copy host data to
# it: a CUDA graph cannot capture any of them.
HOST_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default,
            aten.lift_fresh.default, aten.bincount.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.equal.default, aten.is_nonzero.default}  # fmt: skip


OPAQUE = {torch.ops.ossrl.cached_decode_attention.default, torch.ops.ossrl.mxfp4_grouped_matmul.default}


class HostReads(TorchDispatchMode):
    """Records every op that would read the GPU on the host (plus ``Tensor.tolist``, which bypasses dispatch),
    with the innermost ossrl frame that issued it. The attention and MXFP4 GEMM ops run unwatched: on a GPU they
    are Triton kernels launched on grids of static size (the GPU tests capture them)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.paused = False

    def _record(self, what: str) -> None:
        import traceback

        frames = [f for f in traceback.extract_stack() if "/ossrl/" in f.filename]
        where = f"{frames[-1].filename.split('/ossrl/')[-1]}:{frames[-1].lineno}" if frames else "?"
        self.seen.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in OPAQUE:  # Triton kernels on a GPU, capture-checked there
            self.paused = True
            try:
                return func(*args, **kwargs)
            finally:
                self.paused = False
        if not self.paused:
            boolean_index = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
            sized = func.overloadpacket is aten.repeat_interleave and kwargs.get("output_size") is None
            if func in HOST_OPS or boolean_index or (sized and len(args) and args[0].dtype != torch.bool):
                self._record(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        mode = self

        def tolist(tensor):
            if not mode.paused:
                mode._record("Tensor.tolist")
            return mode._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_host_reads_sees_what_a_graph_cannot_capture():
    x = torch.arange(6.0)
    with HostReads() as reads:
        x.sum().item()
        x.tolist()
        x[x > 2]
        torch.tensor([1, 2])
        (x * 2).sort()
    assert [r.split(" at ")[0] for r in reads.seen] == [
        "aten._local_scalar_dense.default", "Tensor.tolist", "aten.index.Tensor", "aten.lift_fresh.default"
    ]  # fmt: skip


@pytest.mark.parametrize("moe", ["grouped", "mxfp4", "loop"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_capturable_decode_steps_never_read_the_gpu_on_the_host(tiny, moe, temperature, monkeypatch):
    """Each bucket's step runs once as the graphs' warm-up does, then under ``HostReads``: a bucket that
    ``capture_problem`` passes must show no host read (LoRA on every target, top-k/top-p/min-p sampling); one it
    refuses (the MoE loop path reads group sizes) must show one, so the check can fail."""
    model, tokenizer = tiny
    model = quantize_experts(copy.deepcopy(model)) if moe == "mxfp4" else copy.deepcopy(model)
    apply_lora(model, LoraConfig(r=4, targets=ALL_TARGETS), generator=torch.Generator().manual_seed(0))
    if moe != "loop":  # the CUDA bf16 path: one grouped GEMM (torch._grouped_mm runs on CPU too)
        monkeypatch.setattr("ossrl.kernels.moe._grouped_mm_works", lambda device, dtype: True)
    reads = HostReads()
    original_run, warmed, checked = graphs.DecodeGraphs._run, set(), {}

    def run(self, step, sampling):
        if step.batch not in warmed:  # warm-up: first-use caches (tables on the device, Triton compiles) fill here
            warmed.add(step.batch)
            return original_run(self, step, sampling)
        reads.seen.clear()
        with reads:
            out = original_run(self, step, sampling)
        checked[step.batch] = (graphs.capture_problem(self.model, step.batch), list(reads.seen))
        return out

    monkeypatch.setattr(graphs.DecodeGraphs, "_run", run)
    engine = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4, max_num_seqs=8, cuda_graphs=True)
    sampling = SamplingParams(temperature=temperature, top_k=50, top_p=0.9, min_p=0.01, max_new_tokens=6,
                              stop_token_ids=[])  # fmt: skip
    for n in (1, 3, 6):  # buckets 1, 4 and 8
        engine.generate([Request(p) for p in prompts(n)], sampling)
    assert sorted(checked) == [1, 4, 8]
    for bucket, (problem, seen) in checked.items():
        if problem is None:
            assert not seen, f"bucket {bucket} would be captured but reads the GPU on the host: {seen}"
        else:
            assert seen and moe == "loop", (bucket, problem)
    assert (checked[8][0] is None) == (moe != "loop")  # 16 (token, expert) pairs: too many to gather
    assert checked[1][0] is None  # 2 pairs < 8 experts: gathered, whatever the weights


def test_fixed_buffer_decode_step_gives_the_same_samples(tiny, monkeypatch):
    """cuda_graphs=True on CPU runs the graphs' fixed-buffer step without capture: bucketed batches padded with
    scratch-page rows must sample exactly what the plain step samples, tool turns included."""
    from ossrl.rollout import graphs

    model, tokenizer = tiny
    padded_steps = []
    original = graphs.StaticDecodeStep.load

    def spy(self, seqs, *args):
        padded_steps.append(self.batch - len(seqs))
        return original(self, seqs, *args)

    monkeypatch.setattr(graphs.StaticDecodeStep, "load", spy)
    requests = [Request(p, n=2) for p in prompts(5)]
    calls = render_completion([Message.tool_call("add", {"a": 2, "b": 3})], tokenizer)
    tools = {"add": lambda a, b: a + b}
    for temperature in (0.0, 1.0):
        sampling = SamplingParams(temperature=temperature, max_new_tokens=24, seed=5, stop_token_ids=[])
        plain = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4).generate(requests, sampling)
        fixed = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4, max_num_seqs=7, cuda_graphs=True)
        for a, b in zip(plain, fixed.generate(requests, sampling), strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
                assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-5
    assert padded_steps and max(padded_steps) > 0 and min(padded_steps) == 0  # buckets 1, 2, 4, 7: some padding
    # a tool turn: the tool result goes through the plain step (several tokens), decoding through the fixed one
    script = [*calls, *render_completion([Message.final("5")], tokenizer)]
    prompt = render_conversation([Message.user("2+3?")], tokenizer)
    sampling = SamplingParams(temperature=0, max_new_tokens=80, max_turns=3)
    want = Engine(scripted_policy(model, script), tokenizer).generate([Request(prompt)], sampling, tools=tools)[0][0]
    fixed = Engine(scripted_policy(model, script), tokenizer, cuda_graphs=True)
    got = fixed.generate([Request(prompt)], sampling, tools=tools)[0][0]
    assert got.token_ids == want.token_ids and got.loss_mask == want.loss_mask and got.num_tool_calls == 1


class SimulatedGraph:
    """A captured graph's contract, on CPU: each replay runs the recorded step again (the step's sampling params as
    captured) and writes its results into the tensors the capture returned (a graph's outputs live at fixed
    addresses). A graph bakes in the cache's addresses: replaying one after the cache moved is an error here."""

    def __init__(self, step, run) -> None:
        self.step, self.run, self.ptrs, self.replays = step, run, step.cache.ptrs, 0
        self.tokens, self.logprobs = run(step)

    def replay(self) -> None:
        assert self.step.cache.ptrs == self.ptrs, "a graph replayed after its cache moved"
        self.replays += 1
        tokens, logprobs = self.run(self.step)
        self.tokens.copy_(tokens)
        self.logprobs.copy_(logprobs)


def simulate_capture(monkeypatch, refuse=()) -> list[SimulatedGraph]:
    """Make the engine's graphs capture on CPU (``SimulatedGraph``); buckets in ``refuse`` fail to capture, as CUDA
    refuses an op in a graph. Returns the graphs made."""
    made = []

    def record(self, step, run):
        if step.batch in refuse:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph = SimulatedGraph(step, run)
        made.append(graph)
        return graph, graph.tokens, graph.logprobs

    init = graphs.DecodeGraphs.__init__
    monkeypatch.setattr(graphs.DecodeGraphs, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "capture": True}))
    monkeypatch.setattr(graphs.DecodeGraphs, "_warm_up", lambda self, step, run: run(step))
    monkeypatch.setattr(graphs.DecodeGraphs, "_record", record)
    return made


def assert_same_samples(got, want, tolerance=1e-5):
    for a, b in zip(want, got, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < tolerance


def test_replayed_outputs_are_read_and_a_refused_capture_runs_uncaptured(tiny, monkeypatch, caplog):
    """The captured path with capture simulated on CPU: samples come from the outputs each replay rewrites, and a
    bucket whose capture fails (as CUDA refuses an op in a graph) runs uncaptured with a warning, same samples."""
    import ossrl.kernels.common

    model, tokenizer = tiny
    simulate_capture(monkeypatch, refuse=(2,))
    monkeypatch.setattr(ossrl.kernels.common, "_warned", set())  # warn_once's set: the warning comes again
    requests = [Request(p) for p in prompts(3)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=20, seed=9, stop_token_ids=[])
    want = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4).generate(requests, sampling)
    # one prompt admitted per step: batches 1, 2, 3, then 2, 1 (3 rows x 2 experts < 8 experts: all capturable)
    engine = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4, max_num_seqs=3, cuda_graphs=True,
                    max_prefill_tokens=max(len(r.prompt_ids) for r in requests))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ossrl.kernels"):
        got = engine.generate(requests, sampling)
    assert engine.graph_buckets == {1: True, 2: False, 3: True}
    assert [r for r in caplog.records if "capturing the decode step of 2 sequences failed" in r.getMessage()]
    assert_same_samples(got, want)


def test_graphs_live_across_rollouts_and_are_captured_again_when_the_cache_moves(tiny, monkeypatch):
    """One engine, several rollouts: a bucket is captured once and replayed in later rollouts; after
    ``release_memory`` the cache comes back at another address (forced here: the old tensors are still held) and
    the graph is captured again before its next replay. Samples never change."""
    model, tokenizer = tiny
    made = simulate_capture(monkeypatch)
    requests = [Request(p) for p in prompts(3)]  # all admitted at once: decode bucket 3 (capturable: see above)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=9, stop_token_ids=[])
    want = Engine(model, tokenizer, kv_cache_tokens=1024, page_size=4).generate(requests, sampling)
    engine = Engine(model, tokenizer, kv_cache_tokens=1024, page_size=4, max_num_seqs=3, cuda_graphs=True)
    assert_same_samples(engine.generate(requests, sampling), want)
    decode_graphs, entries = engine._graphs, dict(engine._graphs.entries)
    assert engine.graph_buckets == {3: True} and engine.stats["graph_captures"] == len(made) == 1
    assert made[0].replays == 7  # 8 tokens: the first from the prefill
    assert_same_samples(engine.generate(requests, sampling), want)
    assert engine._graphs is decode_graphs and engine._graphs.entries == entries
    assert engine.stats["graph_captures"] == 1 and made[0].replays == 14  # replayed, not captured again

    held = list(engine._cache.k)  # keeps the old storage alive, so the new cache must land elsewhere
    engine.release_memory()
    assert not engine._cache.allocated
    assert_same_samples(engine.generate(requests, sampling), want)
    assert engine._cache.k[0].data_ptr() != held[0].data_ptr()
    assert engine.stats["cache_allocations"] == 2 and engine.stats["graph_captures"] == len(made) == 2
    assert made[1].replays == 7 and made[0].replays == 14 and engine._graphs is decode_graphs
    engine.generate(requests, sampling)  # same address again: no capture
    assert engine.stats["graph_captures"] == 2 and made[1].replays == 14


def test_a_rollout_with_other_sampling_params_never_replays_stale_ones(tiny, monkeypatch):
    """Temperature, top-k, top-p and min-p are baked into a captured step: each combination gets its own graph
    (kept: the first one comes back), and every rollout samples what a fresh engine samples."""
    model, tokenizer = tiny
    made = simulate_capture(monkeypatch)
    requests = [Request(p) for p in prompts(2)]
    engine = Engine(model, tokenizer, kv_cache_tokens=1024, page_size=4, max_num_seqs=2, cuda_graphs=True)
    settings = [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=0.0), dict(temperature=1.0, top_k=5),
                dict(temperature=1.0, top_p=0.5), dict(temperature=1.0)]  # fmt: skip
    for options in settings:
        sampling = SamplingParams(max_new_tokens=6, seed=2, stop_token_ids=[], **options)
        want = Engine(model, tokenizer, kv_cache_tokens=1024, page_size=4).generate(requests, sampling)
        assert_same_samples(engine.generate(requests, sampling), want)
    assert engine.stats["graph_captures"] == len(made) == 5  # the last rollout replays the first one's graph
    assert made[0].replays == 10


def test_static_step_tables_follow_the_sequences_that_hold_each_row():
    """The fixed-buffer step updates its page tables incrementally: after every step each live row equals the row a
    fresh plan would build (sliding entries from the first page still in use), padding rows sit on the scratch page,
    through pages being added, sliding pages given back, and sequences moving between rows."""
    from ossrl.model.config import GptOssConfig
    from ossrl.rollout.kv_cache import PagedKVCache, _row

    config = GptOssConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], hidden_size=64,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=6)  # fmt: skip
    cache = PagedKVCache(config, full_pages=64, sliding_pages=40, page_size=4, device=torch.device("cpu"),
                         dtype=torch.float32)  # fmt: skip
    step = graphs.StaticDecodeStep(cache, batch=4, width=10)
    seqs = [cache.admit(36, 1) for _ in range(5)]
    for i, seq in enumerate(seqs):  # ragged starting lengths
        graphs.plan_step(cache, [seq], [3 + 2 * i], fresh=True)
        seq.cached_len = 3 + 2 * i
        cache.trim(seq)
    schedule = [[0, 1, 2], [0, 1, 2], [1, 2, 3, 4], [4, 2], [4, 2, 0], [3]] + [[0, 1, 2, 3]] * 12
    for members in schedule:
        live = [seqs[m] for m in members]
        step.load(live, [7] * len(live), [1] * len(live), [s.cached_len for s in live])
        for i, seq in enumerate(live):
            assert step.full_table[i].tolist() == _row(seq.full, 10)
            fresh, got = _row(seq.sliding, 10), step.sliding_table[i].tolist()
            assert got[seq.trimmed : len(seq.sliding)] == fresh[seq.trimmed : len(seq.sliding)]
            assert step.seq_lens[i] == seq.cached_len + 1 and step.positions[i] == seq.cached_len
        for i in range(len(live), 4):
            assert set(step.full_table[i].tolist()) == {cache.scratch[False]}
            assert set(step.sliding_table[i].tolist()) == {cache.scratch[True]}
            assert step.seq_lens[i] == 1 and step.full_slots[i] == cache.scratch[False] * 4
        step.finish(live, [1] * len(live))
    assert seqs[0].trimmed > 0  # sliding pages were given back along the way


def compiled_matches_plain(model, tokenizer, backend: str, tolerance: float) -> dict:
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=3, stop_token_ids=[])
    compiled = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4, max_num_seqs=8, torch_compile=backend)
    plain = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4)
    for n in (1, 2, 1):  # buckets 1 and 2 compile (one graph each); the second batch of 1 reuses the first
        requests = [Request(p) for p in prompts(n)]
        for a, b in zip(compiled.generate(requests, sampling), plain.generate(requests, sampling), strict=True):
            assert a[0].token_ids == b[0].token_ids
            assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs, strict=True)) < tolerance
    return dict(torch._dynamo.utils.counters["stats"]), dict(torch._dynamo.utils.counters["graph_break"])


def test_torch_compile_traces_each_bucket_whole(tiny):
    """``torch_compile``: the decode step (all layers, attention as one custom op, lm_head, sampler) is ONE graph
    per bucket, no graph break, and samples what the plain engine samples (dynamo's eager backend: fast)."""
    stats, breaks = compiled_matches_plain(*tiny, backend="eager", tolerance=1e-6)
    assert breaks == {} and stats["unique_graphs"] == 2


@pytest.mark.slow
def test_torch_compile_inductor_samples_like_the_plain_engine(tiny):
    stats, breaks = compiled_matches_plain(*tiny, backend="inductor", tolerance=1e-5)
    assert breaks == {} and stats["unique_graphs"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_same_samples(tiny, dtype, monkeypatch):
    """Replayed graphs run the kernels the same step runs uncaptured, so samples and log-probs match exactly; in
    fp32 they also match the plain (unpadded) step's samples."""
    model, tokenizer = tiny
    gpu = GptOss.from_config(model.config, device="cuda", dtype=dtype, seed=None)
    gpu.load_state_dict(model.state_dict())  # copies into each parameter's dtype (norms and sinks stay fp32)
    gpu.eval()
    requests = [Request(p, n=2) for p in prompts(5)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=40, seed=7, stop_token_ids=[])
    engine = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=7, cuda_graphs=True)
    graphed = engine.generate(requests, sampling)
    for bucket, captured in engine.graph_buckets.items():  # fp32: buckets 4 and 7 loop over experts, uncaptured
        assert captured == (graphs.capture_problem(gpu, bucket) is None), engine.graph_buckets
    if dtype == torch.bfloat16:
        assert all(engine.graph_buckets.values()), engine.graph_buckets
    with monkeypatch.context() as m:  # a new engine: this one keeps its captured graphs
        m.setattr(graphs, "capture_problem", lambda model, batch: "this test: uncaptured")
        other = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=7, cuda_graphs=True)
        uncaptured = other.generate(requests, sampling)
    assert not any(other.graph_buckets.values())
    for a, b in zip(graphed, uncaptured, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids and x.logprobs == y.logprobs
    if dtype == torch.float32:
        plain = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=7).generate(requests, sampling)
        for a, b in zip(plain, graphed, strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.token_ids == y.token_ids
                assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_graphs_on_gpu_sample_like_the_plain_engine(tiny):
    """torch.compile + CUDA graphs in fp32 (the buckets that gather their experts compile and capture)."""
    model, tokenizer = tiny
    gpu = copy.deepcopy(model).cuda()
    requests = [Request(p) for p in prompts(2)]  # bucket 2: 4 (token, expert) pairs < 8 experts, gathered
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, seed=2, stop_token_ids=[])
    engine = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=4, cuda_graphs=True, torch_compile=True)
    got = engine.generate(requests, sampling)
    assert engine.graph_buckets == {2: True}
    want = Engine(gpu, tokenizer, kv_cache_tokens=4096).generate(requests, sampling)
    for a, b in zip(got, want, strict=True):
        assert a[0].token_ids == b[0].token_ids
        assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs, strict=True)) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mxfp4_experts_through_the_kernel_in_cuda_graphs(tiny, monkeypatch):
    """bf16 MXFP4 experts: decode runs the in-register MXFP4 GEMM (it passes its self-check), every bucket is
    captured, and replays sample what the same steps sample uncaptured."""
    from ossrl.kernels import mxfp4_ref

    model, tokenizer = tiny
    gpu = GptOss.from_config(model.config, device="cuda", dtype=torch.bfloat16, seed=None)
    gpu.load_state_dict(model.state_dict())
    quantize_experts(gpu.eval())
    assert mxfp4_ref.mxfp4_kernel_works(torch.device("cuda"), torch.bfloat16)
    requests = [Request(p) for p in prompts(5)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, seed=4, stop_token_ids=[])
    engine = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=8, cuda_graphs=True)
    graphed = engine.generate(requests, sampling)
    assert engine.graph_buckets and all(engine.graph_buckets.values()), engine.graph_buckets
    with monkeypatch.context() as m:  # a new engine: this one keeps its captured graphs
        m.setattr(graphs, "capture_problem", lambda model, batch: "this test: uncaptured")
        uncaptured = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=8, cuda_graphs=True).generate(
            requests, sampling
        )
    for a, b in zip(graphed, uncaptured, strict=True):
        assert a[0].token_ids == b[0].token_ids and a[0].logprobs == b[0].logprobs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_across_rollouts_release_memory_and_weight_updates(tiny):
    """One bf16 engine for several rollouts on a GPU: graphs are replayed, captured again only after the cache came
    back at another address, and weights copied in place (``update_weights``) reach the replayed graphs."""
    model, tokenizer = tiny
    gpu = GptOss.from_config(model.config, device="cuda", dtype=torch.bfloat16, seed=None)
    gpu.load_state_dict(model.state_dict())
    gpu.eval()
    requests = [Request(p) for p in prompts(4)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5, stop_token_ids=[])
    engine = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=4, cuda_graphs=True)
    first = engine.generate(requests, sampling)
    captures = engine.stats["graph_captures"]
    assert captures > 0 and all(engine.graph_buckets.values()), engine.graph_buckets
    replayed = engine.generate(requests, sampling)
    assert engine.stats["graph_captures"] == captures
    for a, b in zip(first, replayed, strict=True):
        assert a[0].token_ids == b[0].token_ids and a[0].logprobs == b[0].logprobs
    held = list(engine._cache.k)
    engine.release_memory()
    again = engine.generate(requests, sampling)
    assert engine._cache.k[0].data_ptr() != held[0].data_ptr()
    assert engine.stats["graph_captures"] > captures and engine.stats["cache_allocations"] == 2
    for a, b in zip(first, again, strict=True):
        assert a[0].token_ids == b[0].token_ids and a[0].logprobs == b[0].logprobs
    del held
    new = {n: p * 0.9 for n, p in gpu.named_parameters() if p.dim() > 1}
    engine.update_weights(new.items())
    got = engine.generate(requests, sampling)
    want = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=4, cuda_graphs=True).generate(requests, sampling)
    for a, b in zip(got, want, strict=True):
        assert a[0].token_ids == b[0].token_ids and a[0].logprobs == b[0].logprobs
