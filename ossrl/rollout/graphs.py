"""The decode step in fixed-size buffers, replayed from CUDA graphs.

A decode step (one new token per running sequence) is a few thousand small kernels; launching them costs more than
running them at small batches. ``DecodeGraphs`` captures the whole step — model forward, lm_head and the sampler —
once per batch bucket (1, 2, 4, ... up to the engine's max_num_seqs) and replays it. A step of b sequences runs in
the smallest bucket >= b; the extra rows are padding that writes and reads only the cache's scratch page (token 0,
position 0, length 1), and their samples are dropped. Per step the host fills the fixed buffers (token ids,
positions, seeds, slots, page tables, lengths) with one copy each, replays, reads b tokens back and keeps a copy of
the b log-probs on the device.

Page tables have a fixed width for a rollout (the longest sequence it can produce, rounded up to a power of two
pages), which also bounds the decode kernel's grid under capture. A captured step bakes in its batch bucket, that
width, the sampling params the sampler reads (temperature, top-k, top-p, min-p) and the addresses of the cache
tensors, so an entry is kept per (bucket, width, sampling params) for as long as the engine keeps its cache layout,
and one whose cache was reallocated at another address (``Engine.release_memory``) is captured again before it is
replayed. Weights may change between rollouts as long as they change in place (the optimizer's step,
``Engine.update_weights``): a replay reads whatever the parameters hold. On CPU the same fixed-buffer step runs
without capture (``capture=False``): that is how the CPU tests check the padding and buffer logic against the plain
step (and, with capture simulated, the lifetime rules above).

A graph cannot hold a step that reads GPU values on the host. ``capture_problem`` says when a bucket's step would
(the MoE's loop path, e.g. fp32 on CUDA at larger batches; attention without its Triton kernel); such a bucket runs
the same fixed-buffer step uncaptured, with one warning. So does a bucket whose capture CUDA refuses anyway, and
every bucket in deterministic mode (``ossrl.deterministic()``: its kernels read lengths on the host); entries are
kept per mode, so a step captured in one mode never replays in the other.

With ``record_routes`` each step also keeps the experts its MoE layers chose (``last_routes`` [b, layers, k], router
replay): the layers write them into the step's ``route_log``, which a captured graph's replays rewrite in place.

``compile_backend`` (``Engine(torch_compile=True)``) runs each such bucket's step through ``torch.compile`` first
(static shapes, one compile per bucket; on CUDA the compiled step is what the graph captures), which fuses the
small elementwise ops (norms, rotary, SwiGLU, routing, sampling) between the matmuls. Attention (the cache write and
the paged kernel) is one custom op in the trace (``kv_cache.cached_decode_attention``), so the step stays one graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ossrl.kernels import deterministic_enabled, warn_once
from ossrl.kernels.decode_ref import triton_decode_problem
from ossrl.kernels.moe import expert_path
from ossrl.model.gpt_oss import GptOss, PackedBatch
from ossrl.rollout.kv_cache import CacheStep, PagedKVCache, SequencePages, cached_decode_attention, plan_step
from ossrl.rollout.sampling import SamplingParams, sample_tokens


def buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


def capture_problem(model: GptOss, batch: int) -> str | None:
    """Why the decode step of ``batch`` rows cannot be captured in a CUDA graph (None: it can)."""
    config, device, dtype = model.config, model.device, model.dtype
    if deterministic_enabled():
        return "deterministic mode (its attention and MoE read lengths and expert counts on the host)"
    problem = triton_decode_problem(dtype, config.head_dim)
    if problem:
        return f"attention: {problem}"
    rows = batch * config.num_experts_per_tok
    for layer in model.model.layers:
        experts = layer.mlp.experts
        packed = not isinstance(experts.gate_up_proj, torch.Tensor) or not isinstance(experts.down_proj, torch.Tensor)
        if expert_path(rows, config.num_local_experts, device, dtype, packed) == "loop":
            return (f"MoE: no grouped GEMM for {dtype} on {device.type}, and {rows} (token, expert) pairs are too "
                    "many to gather")  # fmt: skip
    return None


class StaticDecodeStep(CacheStep):
    """``CacheStep`` for one token per sequence in buffers of ``batch`` rows that never move (a graph reads them).

    The host keeps a mirror of every buffer (pinned on CUDA) and copies each whole mirror per step: one copy for
    the seven per-row vectors, one per page table. A page-table row is rewritten only when a different sequence
    takes it; otherwise only the pages a sequence gained since the last step are written, so a step costs O(batch)
    host work, not O(batch x pages). Entries of sliding pages given back stay as they were: a page id in range,
    at positions the window never reads. Rows start (and padding rows stay) on the cache's scratch page.
    """

    # rows of the per-row block: token id, position, seed, sample position, full slot, sliding slot, cached length
    FIELDS = ("ids", "positions", "seeds", "sample_positions", "full_slots", "sliding_slots", "seq_lens")

    def __init__(self, cache: PagedKVCache, batch: int, width: int) -> None:  # no super(): nothing is planned yet
        self.cache, self.fresh, self.max_q_len, self.batch, self.width = cache, False, 1, batch, width
        self.sliding_keep = None
        self.has_sliding = cache.sliding_pool.num_pages > 0
        self.has_full = not all(cache.sliding)
        device, page = cache.device, cache.page_size
        self.scratch_full, self.scratch_sliding = cache.scratch[False], cache.scratch[True]
        self.padding = [0, 0, 0, 0, self.scratch_full * page, self.scratch_sliding * page, 1]
        pin = device.type == "cuda"  # pinned: the copies do not wait for the GPU
        self.host_block = torch.empty(len(self.FIELDS), batch, dtype=torch.long, pin_memory=pin)
        self.host_block[:] = torch.tensor(self.padding).unsqueeze(1)
        self.host_full = torch.full((batch, width), self.scratch_full, dtype=torch.int32, pin_memory=pin)
        self.host_sliding = torch.full((batch, width), self.scratch_sliding, dtype=torch.int32, pin_memory=pin)
        # numpy views of the host mirrors: slice assignment from Python lists runs in C
        self._block, self._full, self._sliding = (t.numpy() for t in (self.host_block, self.host_full,
                                                                       self.host_sliding))  # fmt: skip
        self.rows: list[list] = [[None, 0, 0] for _ in range(batch)]  # per row: sequence, full / sliding pages written
        self.route_log: list[torch.Tensor | None] | None = None  # a list: each layer's experts land here
        self.block = self.host_block.to(device)
        for i, name in enumerate(self.FIELDS):  # views of one device tensor: one copy fills them all
            setattr(self, name, self.block[i])
        self.full_table, self.sliding_table = self.host_full.to(device), self.host_sliding.to(device)
        self.cu_q_lens = torch.arange(batch + 1, dtype=torch.int32, device=device)

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """``CacheStep.attend`` for one token per row, as one custom op (a ``torch.compile`` trace runs through)."""
        sliding = self.cache.sliding[layer_idx]
        return cached_decode_attention(
            q, k, v, sinks, self.cache.k[layer_idx], self.cache.v[layer_idx],
            self.sliding_slots if sliding else self.full_slots, self.sliding_table if sliding else self.full_table,
            self.seq_lens, self.cu_q_lens, window or 0,
        )  # fmt: skip

    def load(self, seqs: list[SequencePages], ids: list[int], seeds: list[int], sample_positions: list[int]) -> None:
        """Plan the step for ``seqs`` (one new token each) and copy it, padded to the bucket, into the buffers."""
        b = len(seqs)
        plan = plan_step(self.cache, seqs, [1] * b, fresh=False, width=self.width, rows=False)
        block = self._block
        block[:, b:] = [[v] for v in self.padding]
        block[0, :b], block[2, :b], block[3, :b] = ids, seeds, sample_positions
        block[1, :b] = [s.cached_len for s in seqs]
        if self.has_full:
            block[4, :b] = plan.full_slots
        if self.has_sliding:
            block[5, :b] = plan.sliding_slots
        block[6, :b] = plan.seq_lens
        for i, seq in enumerate(seqs):
            self._update_row(i, seq)
        for i in range(b, self.batch):
            if self.rows[i][0] is not None:  # a row that held a sequence becomes padding
                self._full[i], self._sliding[i] = self.scratch_full, self.scratch_sliding
                self.rows[i] = [None, 0, 0]
        self.block.copy_(self.host_block, non_blocking=True)
        self.full_table.copy_(self.host_full, non_blocking=True)
        self.sliding_table.copy_(self.host_sliding, non_blocking=True)

    def clear(self) -> None:
        """Every row padding (on the scratch page), on the host and the device: what a warm-up or capture runs."""
        self._block[:] = [[v] for v in self.padding]
        self._full[:], self._sliding[:] = self.scratch_full, self.scratch_sliding
        self.rows = [[None, 0, 0] for _ in range(self.batch)]
        self.block.copy_(self.host_block)
        self.full_table.copy_(self.host_full)
        self.sliding_table.copy_(self.host_sliding)

    def _update_row(self, i: int, seq: SequencePages) -> None:
        row = self.rows[i]
        if row[0] is not seq:  # a different sequence: its whole row, zeros past its pages
            self._full[i], self._sliding[i] = 0, 0
            row[:] = [seq, 0, 0]
        full, sliding = seq.full, seq.sliding
        if len(full) > row[1]:
            self._full[i, row[1] : len(full)] = _checked(full[row[1] :], self.cache.full_pool.num_pages)
            row[1] = len(full)
        if len(sliding) > row[2]:
            new = [max(p, 0) for p in sliding[row[2] :]]
            self._sliding[i, row[2] : len(sliding)] = _checked(new, self.cache.sliding_pool.num_pages)
            row[2] = len(sliding)


def _checked(pages: list[int], num_pages: int) -> list[int]:
    """The per-write stand-in for the decode kernel's value checks (``kv_cache._check`` for the plain step)."""
    if max(pages) >= num_pages:
        raise RuntimeError("rollout KV cache: page ids out of range (a bug in the engine)")
    return pages


def sampling_key(sampling: SamplingParams) -> tuple[float, float, int, float]:
    """What of ``sampling`` a captured step bakes in (temperature, top_p, top_k, min_p): part of its key."""
    return (float(sampling.temperature), float(sampling.top_p), int(sampling.top_k), float(sampling.min_p))


@dataclass
class _Entry:
    step: StaticDecodeStep
    run: Callable[[StaticDecodeStep], tuple[torch.Tensor, torch.Tensor]]  # the step, its sampling params bound
    tokens: torch.Tensor
    logprobs: torch.Tensor
    graph: Any = None  # torch.cuda.CUDAGraph when captured
    cache_ptrs: tuple[int, ...] = ()  # the cache's tensor addresses the graph was captured with
    routes: list[torch.Tensor] | None = None  # the experts per layer each replay writes (captured, record_routes)


class DecodeGraphs:
    """One fixed-buffer decode step per (batch bucket, page-table width, sampling params), captured in a CUDA graph
    when ``capture`` (made lazily, the first time a key is needed). Lives as long as the engine's cache layout:
    entries are replayed across rollouts; one whose cache tensors were reallocated elsewhere (``release_memory``)
    is captured again before its next replay. ``stats["graph_captures"]`` counts captures."""

    def __init__(
        self,
        model: GptOss,
        cache: PagedKVCache,
        *,
        max_batch: int,
        capture: bool,
        compile_backend: str | None = None,
        stats: dict[str, int] | None = None,
        record_routes: bool = False,
    ) -> None:
        self.model, self.cache, self.capture = model, cache, capture
        self.record_routes = record_routes  # keep each step's experts per layer in ``last_routes`` [b, layers, k]
        self.last_routes: torch.Tensor | None = None
        self.compiled = None if compile_backend is None else torch.compile(self._run, backend=compile_backend,
                                                                           dynamic=False)  # fmt: skip
        self.sizes = buckets(max_batch)
        self.steps: dict[tuple[int, int], StaticDecodeStep] = {}  # (bucket, width) -> buffers, shared by samplings
        self.entries: dict[tuple, _Entry] = {}  # (bucket, width, sampling_key, deterministic) -> step to run
        self.used: set[tuple] = set()  # keys stepped since ``begin``
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("graph_captures", 0)
        self.pool = None  # one CUDA memory pool shared by all the graphs (they never run concurrently)

    def _run_compiled(self, step: StaticDecodeStep, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        with torch._dynamo.config.patch(**_recompile_limits(4 * (len(self.entries) + len(self.sizes)))):
            return self.compiled(step, sampling)  # a compile per entry, never dynamo's default limit of 8

    def begin(self) -> None:
        """A new rollout: ``captured`` reports the buckets it uses."""
        self.used = set()

    @property
    def captured(self) -> dict[int, bool]:
        """Bucket -> whether its step was captured in a graph (buckets stepped since ``begin``)."""
        return {key[0]: self.entries[key].graph is not None for key in sorted(self.used, key=lambda k: k[0])}

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _run(self, step: StaticDecodeStep, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        packed = PackedBatch(step.ids, step.cu_q_lens, 1, step.positions, kv_cache=step, route_log=step.route_log)
        logits = self.model.lm_head(self.model.forward_packed(packed)).float()
        return sample_tokens(logits, sampling, step.seeds, step.sample_positions)

    def _entry(self, bucket: int, width: int, sampling: SamplingParams) -> _Entry:
        key = self._key(bucket, width, sampling)
        entry = self.entries.get(key)
        if entry is not None:
            if entry.graph is not None and entry.cache_ptrs != self.cache.ptrs:  # baked-in addresses went stale
                self._capture(entry)
            return entry
        step = self.steps.get((bucket, width))
        if step is None:
            step = self.steps[(bucket, width)] = StaticDecodeStep(self.cache, bucket, width)
            if self.record_routes:
                step.route_log = [None] * self.model.config.num_hidden_layers
        problem = capture_problem(self.model, bucket) if self.capture or self.compiled else None
        if problem:  # what a graph cannot capture, a compile would specialize on (a recompile per step)
            warn_once("decode_graphs", f"CUDA graphs / torch.compile: decode steps of {bucket}+ sequences run "
                      f"uncaptured and uncompiled ({problem})")  # fmt: skip
        bound = SamplingParams(*key[2])  # a copy: the caller's object may change after this call
        fn = self._run_compiled if self.compiled is not None and problem is None else self._run
        entry = _Entry(step, lambda s: fn(s, bound), torch.empty(0), torch.empty(0))
        if problem is None and self.capture:
            self._warm_up_step(entry)
            self._capture(entry)
        self.entries[key] = entry
        return entry

    def _warm_up_step(self, entry: _Entry) -> None:
        entry.step.clear()  # warm-up and capture run on padding rows: they write only the scratch page
        self._warm_up(entry.step, entry.run)

    def _capture(self, entry: _Entry) -> None:
        entry.step.clear()
        entry.graph = None
        try:
            entry.graph, entry.tokens, entry.logprobs = self._record(entry.step, entry.run)
            entry.cache_ptrs = self.cache.ptrs
            # the route tensors the capture wrote: the step's list is shared with other entries and is rewritten
            entry.routes = None if entry.step.route_log is None else list(entry.step.route_log)
            self.stats["graph_captures"] += 1
        except RuntimeError as error:  # an op CUDA refuses in a graph that capture_problem does not know
            warn_once(f"decode_graphs_capture_{entry.step.batch}", f"CUDA graphs: capturing the decode step of "
                      f"{entry.step.batch} sequences failed; it runs uncaptured ({error})")  # fmt: skip

    def _warm_up(self, step: StaticDecodeStep, run: Callable) -> None:
        """Run the step twice on a side stream first: allocator pools, Triton autotuning and compiles settle there
        (an error here is the step's own and propagates)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run(step)
        torch.cuda.current_stream().wait_stream(side)

    def _record(self, step: StaticDecodeStep, run: Callable) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Capture the step: (graph, the token and log-prob tensors each replay writes)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            tokens, logprobs = run(step)
        self.pool = graph.pool()
        return graph, tokens, logprobs

    def step(
        self,
        pages: list[SequencePages],
        ids: list[int],
        seeds: list[int],
        sample_positions: list[int],
        *,
        sampling: SamplingParams,
        width: int,
    ) -> tuple[list[int], torch.Tensor]:
        """One decode step for ``len(pages)`` sequences with page tables ``width`` pages wide: their sampled tokens
        (host list: the one sync per step) and log-probs (fp32 on the device, a copy of the graph's output). Updates
        the cache bookkeeping (lengths, sliding-window trimming) like ``CacheStep.finish``."""
        b = len(pages)
        bucket = next(size for size in self.sizes if size >= b)
        entry = self._entry(bucket, width, sampling)
        self.used.add(self._key(bucket, width, sampling))
        entry.step.load(pages, ids, seeds, sample_positions)
        if entry.graph is not None:
            entry.graph.replay()
            tokens, logprobs = entry.tokens, entry.logprobs[:b].clone()  # the graph rewrites its output next step
            routes = entry.routes  # rewritten in place by the replay
        else:
            tokens, logprobs = entry.run(entry.step)
            logprobs = logprobs[:b]
            routes = entry.step.route_log
        entry.step.finish(pages, [1] * b)
        if self.record_routes:  # what the step's MoE layers chose
            self.last_routes = torch.stack(routes, 1)[:b].clone()
        return tokens[:b].tolist(), logprobs

    @staticmethod
    def _key(bucket: int, width: int, sampling: SamplingParams) -> tuple:
        """An entry's key: what its step bakes in, and the kernels' mode (a step captured or compiled in the fast mode
        must not replay in deterministic mode)."""
        return bucket, width, sampling_key(sampling), deterministic_enabled()


def _recompile_limits(limit: int) -> dict[str, int]:
    """Dynamo's per-function recompile limit (default 8) under the names this torch version has."""
    names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
    return {name: max(limit, getattr(torch._dynamo.config, name)) for name in names
            if hasattr(torch._dynamo.config, name)}  # fmt: skip
