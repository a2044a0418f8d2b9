"""The rollout engine: generation from the policy model itself (same object, same weights, LoRA unmerged).

Continuous batching: requests wait in a queue; a sequence is admitted when the KV cache can hold its longest
possible life (prompt + sampled tokens + tool results), so an admitted sequence never stalls for memory. Each loop
prefills newly admitted prompts (varlen kernel, one prefill shared by a request's n samples) and then runs ONE
forward over every running sequence (paged decode kernel), which also carries tool results being appended (in
chunks of at most ``append_chunk`` tokens). Sampling depends only on (logits, seed, position), so a sequence's
tokens do not depend on its batch-mates.

One engine serves a whole run. Its KV cache layout (pages per pool) is decided at the first rollout and kept; the
cache tensors stay allocated between rollouts until ``release_memory`` (the trainer's update wants the memory),
and the next rollout allocates the same layout again. Decode graphs (``cuda_graphs`` / ``torch_compile``) live as
long as the layout. Sampler log-probs stay on the device: each step's tensor is kept and a sequence records where
its tokens' log-probs are; the ``RolloutBatch`` gathers them with one ``cat`` and one index at the end.

The same scheduler also runs step by step (``Engine.stream()`` -> :class:`EngineStream`, what the HTTP server
drives): requests, each with its own ``SamplingParams``, join at any step, their tokens go to a listener as they are
sampled, and a request can be cancelled. Rows of one forward with different sampling params are sampled in groups;
a rollout has one group, so its path is the single ``sample_tokens`` call it always was.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ossrl.model.gpt_oss import GptOss, PackedBatch
from ossrl.rollout.batch import ERROR, FINISH_REASONS, Completion, RolloutBatch
from ossrl.rollout.graphs import DecodeGraphs, sampling_key
from ossrl.rollout.kv_cache import CacheStep, PagedKVCache, sliding_pages_per_sequence, to_device
from ossrl.rollout.sampling import SamplingParams, sample_tokens
from ossrl.rollout.sequence import RunningSequence
from ossrl.rollout.tools import ToolRunner, Tools

__all__ = ["FINISH_REASONS", "Completion", "Engine", "EngineStream", "Request"]

log = logging.getLogger(__name__)

TOOL_RESULT_SLACK = 64  # tokens a tool result may take beyond max_tool_tokens (message header, next assistant header)


@dataclass
class Request:
    """A prompt (token ids, e.g. from ``ossrl.harmony.render_conversation``) and how many samples to draw."""

    prompt_ids: list[int]
    n: int = 1


Listener = Callable[[int, int | None, str | None], None]  # (sample, sampled token or None, finish or None)


@dataclass
class _Job:
    """One request in the scheduler, with its own sampling params and stop tokens (a rollout's jobs share theirs;
    a stream's each bring their own)."""

    request: Request
    sampling: SamplingParams
    stop_ids: frozenset[int]
    reserve: int  # tokens a sequence may add to its prompt (sampled and appended)
    seed_key: int  # mixed into each sample's seed with the sampling seed (a rollout: the request's index)
    results: list[RunningSequence | None]
    listener: Listener | None = None  # a stream's: told of every sampled token and of each sample's finish
    live: int = 0  # samples admitted and not finished


@dataclass
class _Rollout:
    """The scheduler's state: one rollout call's, or a stream's for as long as it is open."""

    runner: ToolRunner | None
    jobs: dict[int, _Job] = field(default_factory=dict)  # request id -> job
    queue: deque[int] = field(default_factory=deque)  # request ids waiting for admission, in order
    sampling: SamplingParams | None = None  # a rollout's one SamplingParams (what decode graphs bake in)
    keep_logprobs: bool = True  # a stream keeps nothing once a request is done (it could run for days)
    errors: dict[int, str] = field(default_factory=dict)  # request -> why it cannot run
    width: int = 0  # page-table width of the fixed-buffer decode step (0: no decode graphs)
    running: list[RunningSequence] = field(default_factory=list)
    waiting: dict[int, RunningSequence] = field(default_factory=dict)  # id(seq) -> sequence whose tool is running
    logprobs: list[torch.Tensor] = field(default_factory=list)  # each step's sampler log-probs, on the device
    num_logprobs: int = 0
    keep_routes: bool = False  # record the experts each forward's MoE layers chose (router replay)
    routes: list[torch.Tensor] = field(default_factory=list)  # each forward's [rows, layers, k] int16, on the device
    num_routes: int = 0

    def record(self, logprobs: torch.Tensor) -> int:
        """Keep one step's log-probs; returns the flat index of its first row."""
        first = self.num_logprobs
        if self.keep_logprobs:
            self.logprobs.append(logprobs)
        self.num_logprobs += logprobs.shape[0]
        return first

    def record_routes(self, routes: torch.Tensor) -> int:
        """Keep one forward's experts per row and layer; returns the flat index of its first row."""
        first = self.num_routes
        self.routes.append(routes.to(torch.int16))
        self.num_routes += routes.shape[0]
        return first


class Engine:
    """Generate from a ``GptOss`` model.

    ``kv_cache_tokens``: tokens the full-attention layers' cache holds over all running sequences (default: 90%
    of free GPU memory at the first rollout on CUDA, 65,536 on CPU). ``max_num_seqs`` bounds the decode batch,
    ``max_prefill_tokens`` the tokens of one prefill forward, ``append_chunk`` the tokens of a tool result fed in
    one step (with the window, it sizes the sliding-window layers' pool). ``tokenizer`` (with Harmony tokens) is
    needed for tool calls and supplies the default stop tokens. ``cuda_graphs=True``: decode steps run from
    fixed-size buffers, replayed from CUDA graphs on a GPU (``ossrl.rollout.graphs``); on CPU the fixed-buffer step
    runs without capture. Off by default until it has been measured on a GPU. ``torch_compile=True`` (or a backend
    name) compiles that step with ``torch.compile`` (one compile per batch bucket; with ``cuda_graphs`` the graphs
    capture the compiled step).

    ``stats``: ``rollouts`` (calls), ``cache_layouts`` (layouts decided: 1 unless a rollout needed a re-layout),
    ``cache_allocations`` (times the cache tensors were allocated: once, plus once after each ``release_memory``),
    ``graph_captures`` (CUDA graphs captured, recaptures included). ``stream()`` runs the scheduler one step at a
    time instead of one rollout to completion (a server's continuous batching).
    """

    def __init__(
        self,
        model: GptOss,
        tokenizer=None,
        *,
        page_size: int = 16,
        kv_cache_tokens: int | None = None,
        max_num_seqs: int = 256,
        max_prefill_tokens: int = 16384,
        max_model_len: int | None = None,
        append_chunk: int = 128,
        cuda_graphs: bool = False,
        torch_compile: bool | str = False,
        record_routes: bool = True,
    ) -> None:
        if append_chunk < 1:
            raise ValueError(f"Engine: append_chunk must be >= 1; got {append_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.page_size = page_size
        self.kv_cache_tokens = kv_cache_tokens
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.append_chunk = append_chunk
        self.cuda_graphs = cuda_graphs
        self.record_routes = record_routes
        self.compile_backend = ("inductor" if torch_compile is True else torch_compile) or None
        self.stats: dict[str, int] = {"rollouts": 0, "cache_layouts": 0, "cache_allocations": 0, "graph_captures": 0}
        self.weights_version = 0
        self.graph_buckets: dict[int, bool] = {}  # last rollout: decode bucket -> captured in a CUDA graph
        self.harmony = None
        self._cache: PagedKVCache | None = None
        self._layout_seqs = 0  # sequences the sliding-window pool of the current layout holds
        self._graphs: DecodeGraphs | None = None
        self._stream: EngineStream | None = None
        self._fed: tuple[torch.Tensor, list[int]] | None = None  # the last forward's routes and rows per sequence
        if tokenizer is not None:
            from ossrl.harmony import HarmonyTokens

            self.harmony = HarmonyTokens.from_tokenizer(tokenizer)

    # ---- public API --------------------------------------------------------------------------------------------
    def default_stop_ids(self) -> list[int]:
        if self.harmony is not None:
            return list(self.harmony.stop)
        eos = self.model.config.eos_token_id
        if eos is None:
            raise ValueError("no stop tokens: pass SamplingParams.stop_token_ids, or an Engine tokenizer")
        return [eos] if isinstance(eos, int) else list(eos)

    def rollout(
        self, requests: list[Request], sampling: SamplingParams, tools: Tools | None = None, *,
        first_request_id: int = 0,
    ) -> RolloutBatch:  # fmt: skip
        """One sequence per (request, sample), request-major: ``group`` is the request's index in ``requests``,
        ``sample`` the sample's. With ``tools`` (name -> callable or async callable taking the call's JSON arguments
        as keyword arguments), a sequence that ends in a Harmony tool call gets the tool's result appended (loss mask
        False, log-prob 0) and continues, up to ``sampling.max_turns`` assistant turns. A request that cannot run
        (empty prompt, ids outside the vocabulary, too long for the context or the cache, ``n < 1``) gives
        ``max(n, 1)`` sequences with ``finish == "error"``, no tokens at all (prompt length 0) and the reason in
        ``errors``. Tensors are on the model's device. Request ``i``'s samples draw from the random streams of request
        id ``first_request_id + i``: a data-parallel rank that samples requests ``a..b`` of a step passes ``a``, so
        the union of the ranks' samples is what one process sampling all of them draws."""
        state = self._run(requests, sampling, tools, first_request_id)
        return self._batch(requests, state)

    def generate(
        self, requests: list[Request], sampling: SamplingParams, tools: Tools | None = None
    ) -> list[list[Completion]]:
        """``rollout`` as Python lists: per request, its ``n`` completions (an error request: one or ``n``)."""
        return self.rollout(requests, sampling, tools).completions()

    def stream(self) -> EngineStream:
        """The scheduler run step by step (a server's continuous batching; see :class:`EngineStream`). One stream at a
        time, and no ``rollout`` while it is open: they share the KV cache."""
        if self._stream is not None:
            raise RuntimeError("rollout engine: a stream is already open on this engine")
        self._stream = EngineStream(self)
        return self._stream

    def release_memory(self, graphs: bool = False) -> None:
        """Free the KV cache's tensors (and return cached blocks to CUDA), e.g. while the trainer updates the
        weights. The layout is kept: the next rollout allocates the same cache again. Decode graphs are kept too
        (``graphs=True`` drops them and their memory pool); one whose cache came back at another address is captured
        again before it is replayed."""
        if self._stream is not None:
            raise RuntimeError("rollout engine: release_memory with a stream open (close the stream first)")
        if self._cache is not None:
            self._cache.free()
        if graphs:
            self._graphs = None
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> int:
        """The trainer -> engine weight sync: the one boundary through which new weights reach the engine.

        ``named_tensors`` (names as in ``model.named_parameters()`` / ``named_buffers()``, LoRA adapters included)
        are copied in place into the engine's model (cast to each target's dtype and device); every name and shape
        is checked before anything is copied (ValueError naming the first bad one). In-place copies keep every
        address, so captured decode graphs stay valid. Returns the number of tensors copied. ``None``: the engine
        shares the trainer's model object (one GPU), which the optimizer updates in place, so there is nothing to
        copy. Either way ``weights_version`` goes up by one. A multi-GPU trainer (engine on other ranks or
        processes) sends its gathered tensors through here."""
        copied = 0
        if named_tensors is not None:
            targets = dict(self.model.named_parameters())
            targets.update(self.model.named_buffers())
            pairs = list(named_tensors)
            for name, tensor in pairs:
                target = targets.get(name)
                if target is None:
                    raise ValueError(f"update_weights: the engine's model has no parameter or buffer {name!r}")
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}; the engine's "
                                     f"model has {tuple(target.shape)}")  # fmt: skip
            for name, tensor in pairs:
                targets[name].data.copy_(tensor)
            copied = len(pairs)
        self.weights_version += 1
        return copied

    # ---- one rollout -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(
        self, requests: list[Request], sampling: SamplingParams, tools: Tools | None, first_request_id: int = 0
    ) -> _Rollout:
        if self._stream is not None:
            raise RuntimeError("rollout engine: a stream is open on this engine (close it before a rollout)")
        vocab = self.model.config.vocab_size
        sampling.validate(vocab)
        stop_ids = frozenset(sampling.stop_token_ids if sampling.stop_token_ids is not None
                             else self.default_stop_ids())  # fmt: skip
        if tools and self.harmony is None:
            raise ValueError("tool calls need the Engine's tokenizer (Engine(model, tokenizer))")
        self.stats["rollouts"] += 1
        tool_tokens = sampling.max_tool_tokens + TOOL_RESULT_SLACK if tools else 0
        reserve = sampling.max_new_tokens + (sampling.max_turns - 1) * tool_tokens
        cache = self._ready_cache(requests, reserve)
        cache.reset()  # every page free: nothing of an earlier (perhaps interrupted) rollout survives
        runner = ToolRunner(tools or {}, self.tokenizer, sampling) if tools else None
        state = _Rollout(runner, sampling=sampling, keep_routes=self.record_routes)
        for i, request in enumerate(requests):
            state.jobs[i] = _Job(request, sampling, stop_ids, reserve, seed_key=first_request_id + i,
                                  results=[None] * request.n)  # fmt: skip
            problem = self._check_request(request, vocab, reserve, cache)
            if problem:
                state.errors[i] = problem
            else:
                state.queue.append(i)
        graphs = None
        if (self.cuda_graphs or self.compile_backend) and state.queue:  # both run the fixed-buffer decode step
            longest = max(min(len(requests[i].prompt_ids) + reserve, self.max_model_len) for i in state.queue)
            state.width = self._table_width(longest)
            graphs = self._decode_graphs(cache)
            graphs.begin()
        try:
            while state.queue or state.running or state.waiting:
                self._tick(state)
        finally:
            self.graph_buckets = graphs.captured if graphs is not None else {}
            if runner is not None:
                runner.close()
        return state

    def _tick(self, state: _Rollout) -> list[RunningSequence]:
        """One round of the scheduler: admit (and prefill) what fits, collect finished tools, then ONE decode forward
        over every running sequence with something to feed. Returns the sequences that forward ran."""
        admitted = self._admit(state)
        if not admitted and state.queue and not state.running and not state.waiting:  # checked up front
            raise RuntimeError(f"rollout engine: request {state.queue[0]} can never be admitted")
        if admitted:
            self._prefill(admitted, state)
        if state.runner is not None:
            for seq in state.runner.collect(state.waiting, block=not state.running and not state.queue):
                if seq.length > seq.max_len:  # a tool result longer than its budget
                    self._finish(seq, "length", state)
                else:
                    state.running.append(seq)
        decoding = [s for s in state.running if s.pending]
        if decoding:
            self._step(decoding, state)
        elif not state.queue and not state.waiting and state.running:
            raise RuntimeError("rollout engine: running sequences with nothing to feed")  # a bug, not input
        return decoding

    def _batch(self, requests: list[Request], state: _Rollout) -> RolloutBatch:
        """The finished rollout as packed tensors (made outside inference mode: the trainer computes with them)."""
        tokens: list[int] = []
        index: list[int] = []  # per token: flat index of its sampler log-prob, -1 for prompt and appended tokens
        route_index: list[int] = []  # per token: flat index of its experts (the forward that fed it), -1: never fed
        per_seq: dict[str, list] = {k: [] for k in ("prompt_lens", "group", "sample", "finish", "num_tool_calls",
                                                    "tool_errors", "seconds")}  # fmt: skip
        lens, errors = [], []
        for i, request in enumerate(requests):
            if i in state.errors:
                for j in range(max(request.n, 1)):
                    values = dict(prompt_lens=0, group=i, sample=j, finish=ERROR, num_tool_calls=0, tool_errors=0,
                                  seconds=0.0)  # fmt: skip
                    for name, value in values.items():
                        per_seq[name].append(value)
                    lens.append(0)
                    errors.append(state.errors[i])
                continue
            for s in state.jobs[i].results:
                tokens += s.prompt
                tokens += s.new
                index += [-1] * len(s.prompt)
                index += s.logprob_index
                route_index += s.route_index + [-1] * (s.length - len(s.route_index))
                values = dict(prompt_lens=len(s.prompt), group=i, sample=s.sample,
                              finish=FINISH_REASONS.index(s.finish), num_tool_calls=s.tool_calls,
                              tool_errors=s.tool_errors, seconds=s.seconds)  # fmt: skip
                for name, value in values.items():
                    per_seq[name].append(value)
                lens.append(s.length)
                errors.append(None)
        device = self.model.device
        with torch.inference_mode(False):
            flat = torch.tensor(index, dtype=torch.long)
            sampled = flat >= 0
            flat.masked_fill_(~sampled, state.num_logprobs)  # -> the zero appended below
            pool = torch.cat([*state.logprobs, torch.zeros(1, device=device)])  # ONE cat of all the steps' tensors
            cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(lens, dtype=torch.long).cumsum(0)
            dtypes = {"seconds": torch.float64}
            token_fields = {}
            if state.keep_routes:  # routes[t, layer] = the experts chosen when position t was fed (-1: never fed)
                config = self.model.config
                unfed = torch.full((1, config.num_hidden_layers, config.num_experts_per_tok), -1, dtype=torch.int16,
                                   device=device)  # fmt: skip
                rows = torch.tensor(route_index, dtype=torch.long)
                rows.masked_fill_(rows < 0, state.num_routes)
                token_fields["routes"] = torch.cat([*state.routes, unfed])[rows.to(device)]
            return RolloutBatch(
                tokens=torch.tensor(tokens, dtype=torch.long).to(device), cu_seqlens=cu.to(device),
                loss_mask=sampled.to(device), sampler_logprobs=pool[flat.to(device)],
                **{k: torch.tensor(v, dtype=dtypes.get(k, torch.long)).to(device) for k, v in per_seq.items()},
                errors=errors, token_fields=token_fields,
            )  # fmt: skip

    # ---- the cache and the graphs across rollouts --------------------------------------------------------------
    def _ready_cache(self, requests: list[Request], reserve: int) -> PagedKVCache:
        """The engine's cache, allocated: the layout decided at the first rollout, laid out again (with a warning)
        only when a request's n samples outnumber the sequences the sliding-window pool holds, or when, sized from
        free GPU memory, it no longer fits what is free."""
        cache = self._cache if self._cache is not None else self._layout(self.max_num_seqs)
        fresh = cache is not self._cache
        max_lens = [min(len(r.prompt_ids) + reserve, self.max_model_len) for r in requests]
        groups = [r.n for r, max_len in zip(requests, max_lens, strict=True)
                  if r.n > self._layout_seqs and 0 < len(r.prompt_ids) < self.max_model_len
                  and self._full_pool_fits(cache, max_len, r.n)]  # fmt: skip
        if groups:
            if not fresh:
                log.warning("rollout engine: a request of %d samples outnumbers the %d sequences the KV cache was "
                            "laid out for; laying it out again (decode graphs are captured again)", max(groups),
                            self._layout_seqs)  # fmt: skip
                self._drop_cache()
            cache, fresh = self._layout(max(groups)), True
        elif not fresh and not cache.allocated and self._shrink_needed(cache):
            log.warning("rollout engine: the KV cache (%.2f GiB) no longer fits free GPU memory; laying it out "
                        "again, smaller (decode graphs are captured again)", cache.nbytes / 2**30)  # fmt: skip
            self._drop_cache()
            cache, fresh = self._layout(self._layout_seqs), True
        if fresh:
            self._cache = cache
            self.stats["cache_layouts"] += 1
        if not cache.allocated:
            cache.allocate()
            self.stats["cache_allocations"] += 1
        return cache

    def _layout(self, seqs: int) -> PagedKVCache:
        """A cache layout (not allocated) whose sliding-window pool holds ``seqs`` sequences."""
        config, device, dtype, page = self.model.config, self.model.device, self.model.dtype, self.page_size
        n_full = sum(t == "full_attention" for t in config.layer_types)
        per_seq = sliding_pages_per_sequence(config.sliding_window, page, self.append_chunk)
        sliding_pages = seqs * per_seq if n_full < len(config.layer_types) else 0
        tokens = self.kv_cache_tokens
        if tokens is None:
            if device.type == "cuda":
                per_token = 2 * config.num_key_value_heads * config.head_dim * torch.finfo(dtype).bits // 8
                sliding_bytes = sliding_pages * page * per_token * (len(config.layer_types) - n_full)
                tokens = int((0.9 * self._free_memory() - sliding_bytes) / max(1, per_token * n_full))
            else:
                tokens = 65536
        self._layout_seqs = seqs
        return PagedKVCache(config, full_pages=max(1, tokens // page), sliding_pages=sliding_pages, page_size=page,
                            device=device, dtype=dtype, allocate=False)  # fmt: skip

    def _free_memory(self) -> int:
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.model.device)
        return free

    def _shrink_needed(self, cache: PagedKVCache) -> bool:
        """Sized from free memory (no ``kv_cache_tokens``) on CUDA, and that memory is no longer free."""
        if self.kv_cache_tokens is not None or self.model.device.type != "cuda":
            return False
        return cache.nbytes > 0.95 * self._free_memory()

    def _full_pool_fits(self, cache: PagedKVCache, max_len: int, copies: int) -> bool:
        return all(cache.sliding) or copies * cache.pages_for(max_len, self.page_size) <= cache.num_pages[False]

    def _drop_cache(self) -> None:
        if self._cache is not None:
            self._cache.free()
        self._cache = self._graphs = None  # the graphs' steps hold the old layout's scratch pages

    def _decode_graphs(self, cache: PagedKVCache) -> DecodeGraphs:
        if self._graphs is None or self._graphs.cache is not cache:
            self._graphs = DecodeGraphs(self.model, cache, max_batch=self.max_num_seqs,
                                        capture=self.cuda_graphs and self.model.device.type == "cuda",
                                        compile_backend=self.compile_backend, stats=self.stats,
                                        record_routes=self.record_routes)  # fmt: skip
        return self._graphs

    def _table_width(self, longest: int) -> int:
        """Page-table width of the fixed-buffer decode step for sequences of up to ``longest`` tokens: the next
        power of two pages (graphs are kept per width, so rollouts of similar lengths share them)."""
        need = PagedKVCache.pages_for(longest, self.page_size)
        width = 1 << max(0, need - 1).bit_length()
        return max(need, min(width, PagedKVCache.pages_for(self.max_model_len, self.page_size)))

    # ---- scheduling --------------------------------------------------------------------------------------------
    def _check_request(self, request: Request, vocab: int, reserve: int, cache: PagedKVCache) -> str | None:
        if request.n < 1:
            return f"n must be >= 1; got {request.n}"
        if not request.prompt_ids:
            return "empty prompt"
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            return f"prompt has token ids outside the vocabulary ({vocab}): {bad[:5]}"
        if len(request.prompt_ids) >= self.max_model_len:
            return f"prompt of {len(request.prompt_ids)} tokens does not fit the context ({self.max_model_len})"
        max_len = min(len(request.prompt_ids) + reserve, self.max_model_len)
        if not cache.fits_ever(max_len, self.append_chunk, copies=request.n):
            return (f"{request.n} sequence(s) of up to {max_len} tokens can never fit the KV cache; raise "
                    "kv_cache_tokens")  # fmt: skip
        if len(request.prompt_ids) > self.max_prefill_tokens:
            return f"prompt of {len(request.prompt_ids)} tokens exceeds max_prefill_tokens ({self.max_prefill_tokens})"
        return None

    def _admit(self, state: _Rollout) -> list[list[RunningSequence]]:
        """Admit whole requests (all n samples) in order while the cache, batch and prefill budgets allow."""
        cache, admitted, budget, queue = self._cache, [], self.max_prefill_tokens, state.queue
        while queue:
            i = queue[0]
            job = state.jobs[i]
            request = job.request
            max_len = min(len(request.prompt_ids) + job.reserve, self.max_model_len)
            if len(state.running) + request.n > self.max_num_seqs and state.running:
                break
            if len(request.prompt_ids) > budget:
                break
            pages = []
            for _ in range(request.n):
                p = cache.admit(max_len, self.append_chunk)
                if p is None:
                    break
                pages.append(p)
            if len(pages) < request.n:
                for p in pages:
                    cache.release(p)
                break
            queue.popleft()
            budget -= len(request.prompt_ids)
            now = time.perf_counter()
            group = [RunningSequence(i, j, _seed(job.sampling.seed, job.seed_key, j), list(request.prompt_ids), p,
                                     max_len, start_time=now) for j, p in enumerate(pages)]  # fmt: skip
            group[0].pending = list(request.prompt_ids)
            job.live = len(group)
            admitted.append(group)
        return admitted

    # ---- forwards ----------------------------------------------------------------------------------------------
    def _forward(self, seqs: list[RunningSequence], fresh: bool) -> torch.Tensor:
        """One forward over the pending tokens of ``seqs`` (a fresh prefill takes them all; an append at most
        ``append_chunk``, the rest stays pending); returns the logits of the last token of each sequence left with
        nothing pending (the others are mid-way through a tool result: no lm_head for them)."""
        cache = self._cache
        q_lens = [len(s.pending) if fresh else min(len(s.pending), self.append_chunk) for s in seqs]
        device = self.model.device
        ids = to_device([t for s, n in zip(seqs, q_lens, strict=True) for t in s.pending[:n]], torch.long, device)
        positions = [p for s, n in zip(seqs, q_lens, strict=True)
                     for p in range(s.pages.cached_len, s.pages.cached_len + n)]  # fmt: skip
        positions = to_device(positions, torch.long, device)
        step = CacheStep(cache, [s.pages for s in seqs], q_lens, fresh)
        recording = self.record_routes and self._stream is None  # (a stream keeps nothing)
        route_log = [None] * self.model.config.num_hidden_layers if recording else None
        batch = PackedBatch(ids, step.cu_q_lens, step.max_q_len, positions, kv_cache=step, route_log=route_log)
        hidden = self.model.forward_packed(batch)
        step.finish([s.pages for s in seqs], q_lens)
        self._fed = (torch.stack(route_log, 1), q_lens) if recording else None  # see _keep_routes
        for s, n in zip(seqs, q_lens, strict=True):
            s.pending = s.pending[n:]
        ready = [k for k, s in enumerate(seqs) if not s.pending]
        if step.max_q_len > 1 or len(ready) < len(seqs):  # a decode step's rows are already one per sequence
            last = [q - 1 for q in itertools.accumulate(q_lens)]
            hidden = hidden[to_device([last[k] for k in ready], torch.long, device)]
        return self.model.lm_head(hidden).float() if ready else hidden[:0]

    def _prefill(self, groups: list[list[RunningSequence]], state: _Rollout) -> None:
        leaders = [g[0] for g in groups]
        logits = self._forward(leaders, fresh=True)
        self._keep_routes(leaders, state)
        seqs, rows = [], []
        for row, group in enumerate(groups):
            for follower in group[1:]:
                self._cache.copy_pages(group[0].pages, follower.pages)
                follower.route_index = list(group[0].route_index)
            seqs.extend(group)
            rows.extend([row] * len(group))
        self._sample_and_route(seqs, logits[rows], state)

    def _step(self, seqs: list[RunningSequence], state: _Rollout) -> None:
        graphs = self._graphs if state.width else None  # only a rollout (one SamplingParams for all) has a width
        if graphs is not None and graphs.fits(len(seqs)) and all(len(s.pending) == 1 for s in seqs):
            ids = [s.pending[0] for s in seqs]
            for s in seqs:
                s.pending = []
            tokens, logprobs = graphs.step([s.pages for s in seqs], ids, [s.seed for s in seqs],
                                           [s.length for s in seqs], sampling=state.sampling,
                                           width=state.width)  # fmt: skip
            stepped = {id(s) for s in seqs}
            state.running[:] = [s for s in state.running if id(s) not in stepped]
            if state.keep_routes:
                row = state.record_routes(graphs.last_routes)
                for k, s in enumerate(seqs):
                    s.route_index.append(row + k)
            self._route(seqs, tokens, logprobs, state)
            return
        logits = self._forward(seqs, fresh=False)
        self._keep_routes(seqs, state)  # a tool result being appended, or no graphs
        ready = [s for s in seqs if not s.pending]  # the rest are mid-way through a tool result
        if ready:
            done = {id(s) for s in ready}
            state.running[:] = [s for s in state.running if id(s) not in done]
            self._sample_and_route(ready, logits, state)

    def _keep_routes(self, seqs: list[RunningSequence], state: _Rollout) -> None:
        """Router replay: keep the experts the last ``_forward`` chose for every position it fed (per layer); each
        sequence notes the rows of its positions."""
        if not state.keep_routes or self._fed is None:
            return
        (routes, q_lens), self._fed = self._fed, None
        row = state.record_routes(routes)
        for s, n in zip(seqs, q_lens, strict=True):
            s.route_index.extend(range(row, row + n))
            row += n

    def _sample_and_route(self, seqs: list[RunningSequence], logits: torch.Tensor, state: _Rollout) -> None:
        """Sample every row with its own request's SamplingParams: rows are grouped by what the sampler reads
        (temperature, top-p, top-k, min-p), one ``sample_tokens`` call per group (one call when all share them, as
        in a rollout). A row's sample depends only on its logits, seed and position, so grouping changes nothing."""
        device = logits.device
        seeds = to_device([s.seed for s in seqs], torch.long, device)
        positions = to_device([s.length for s in seqs], torch.long, device)
        groups: dict[tuple, list[int]] = {}
        params: dict[tuple, SamplingParams] = {}
        for row, s in enumerate(seqs):
            sampling = state.jobs[s.request].sampling
            key = sampling_key(sampling)
            groups.setdefault(key, []).append(row)
            params.setdefault(key, sampling)
        if len(groups) == 1:
            tokens, logprobs = sample_tokens(logits, next(iter(params.values())), seeds, positions)
        else:
            tokens = torch.empty(len(seqs), dtype=torch.long, device=device)
            logprobs = torch.empty(len(seqs), dtype=torch.float32, device=device)
            for key, rows in groups.items():
                index = to_device(rows, torch.long, device)
                tokens[index], logprobs[index] = sample_tokens(logits[index], params[key], seeds[index],
                                                               positions[index])  # fmt: skip
        self._route(seqs, tokens.tolist(), logprobs, state)

    def _route(self, seqs: list[RunningSequence], tokens: list[int], logprobs: torch.Tensor, state: _Rollout) -> None:
        """Record each sequence's sampled token (its log-prob stays on the device: the sequence keeps its index);
        finish it, hand it to its tool, or keep it running."""
        first, runner = state.record(logprobs), state.runner
        for k, (s, token) in enumerate(zip(seqs, tokens, strict=True)):
            job = state.jobs[s.request]
            sampling = job.sampling
            s.add_sampled(token, first + k)
            if job.listener is not None:
                job.listener(s.sample, token, None)
            reason = None
            if token in job.stop_ids:
                is_call = self.harmony is not None and token == self.harmony.call
                if is_call and runner is not None and s.tool_calls < sampling.max_turns - 1:
                    s.tool_calls += 1
                    runner.submit(s, s.new[s.turn_start :])
                    state.waiting[id(s)] = s
                    continue
                reason = "tool_call" if is_call else "stop"
            elif s.sampled >= sampling.max_new_tokens or s.length >= s.max_len:
                reason = "length"
            if reason is None:
                s.pending = [token]
                state.running.append(s)
            else:
                self._finish(s, reason, state)

    def _finish(self, s: RunningSequence, reason: str, state: _Rollout) -> None:
        s.finish, s.seconds = reason, time.perf_counter() - s.start_time
        job = state.jobs[s.request]
        self._cache.release(s.pages)
        job.live -= 1
        if job.listener is not None:
            job.listener(s.sample, None, reason)
            if job.live == 0:
                del state.jobs[s.request]  # a stream keeps nothing of a finished request
        else:
            job.results[s.sample] = s


class EngineStream:
    """The engine's scheduler, run one step at a time by its caller (``Engine.stream()``): continuous batching for a
    server.

    ``submit`` a request with its own ``SamplingParams`` at any time; it joins the running batch at the next
    ``step`` the KV cache allows (each ``step`` admits and prefills what fits, then runs ONE decode forward over
    every running sequence; rows with different sampling params are sampled in groups). Each sampled token goes to
    the request's listener as ``listener(sample, token, None)`` and each sample's end as ``listener(sample, None,
    finish)`` (``stop`` / ``length``). ``cancel`` drops a request, or one of its samples, and frees its pages.

    Sampling is the rollout's: a sample's tokens depend only on the model, its prompt, its params and its seed, so a
    request sampled here gets the tokens ``Engine.generate([request], sampling)`` gives (``seed_key=0``; fp32 matmuls
    of other batch sizes aside). What a stream leaves out: tools (a server hands tool calls to its client), decode
    graphs, and sampler log-probs (nothing is kept once a request is done).

    Not thread-safe: one thread, the one that runs the model, calls ``submit`` / ``cancel`` / ``step``. ``check``
    reads only what stays fixed while the stream is open and may be called from any thread.

    ``stats``: ``steps`` (decode forwards), ``tokens`` (sampled), ``requests`` (submitted), ``cancelled``
    (sequences), ``max_batch`` (most sequences in one decode forward), ``max_batch_requests`` (most distinct
    requests in one decode forward) and ``batched_steps`` (decode forwards over two requests or more).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cache = engine._ready_cache([], 0)
        self.cache.reset()
        self.state = _Rollout(None, keep_logprobs=False)
        self.stats = dict.fromkeys(("steps", "tokens", "requests", "cancelled", "max_batch", "max_batch_requests",
                                    "batched_steps"), 0)  # fmt: skip
        self._ids = itertools.count()
        self._default_stop = frozenset(engine.default_stop_ids())

    @property
    def busy(self) -> bool:
        """Something to do: requests waiting for admission or sequences running."""
        return bool(self.state.queue or self.state.running)

    @property
    def num_waiting(self) -> int:
        return len(self.state.queue)

    @property
    def num_running(self) -> int:
        return len(self.state.running)

    def check(self, request: Request, sampling: SamplingParams) -> str | None:
        """Why this request can never run here (bad params, prompt, too long for the context or the cache), or None."""
        vocab = self.engine.model.config.vocab_size
        try:
            sampling.validate(vocab)
        except ValueError as err:
            return str(err)
        if sampling.max_turns != 1:
            return "a stream runs no tools: max_turns must be 1"
        return self.engine._check_request(request, vocab, sampling.max_new_tokens, self.cache)

    def submit(self, request: Request, sampling: SamplingParams, listener: Listener, *, seed_key: int = 0) -> int:
        """Queue a request; returns its id. Its samples' seeds mix ``sampling.seed`` with ``seed_key`` (as a
        rollout mixes in the request's index). ValueError when it can never run (see ``check``)."""
        problem = self.check(request, sampling)
        if problem:
            raise ValueError(problem)
        stop_ids = self._default_stop if sampling.stop_token_ids is None else frozenset(sampling.stop_token_ids)
        rid = next(self._ids)
        self.state.jobs[rid] = _Job(request, sampling, stop_ids, sampling.max_new_tokens, seed_key, results=[],
                                    listener=listener)  # fmt: skip
        self.state.queue.append(rid)
        self.stats["requests"] += 1
        return rid

    def cancel(self, rid: int, sample: int | None = None) -> int:
        """Drop request ``rid`` (or only its sample ``sample``) wherever it is; its listener hears nothing more.
        Returns the number of sequences dropped (0 when it had already finished)."""
        state = self.state
        job = state.jobs.get(rid)
        if job is None:
            return 0
        if rid in state.queue:  # not admitted yet: all of it goes (a sample alone cannot have started)
            if sample is not None and job.request.n > 1:
                return 0
            state.queue.remove(rid)
            del state.jobs[rid]
            self.stats["cancelled"] += job.request.n
            return job.request.n
        dropped = [s for s in state.running if s.request == rid and (sample is None or s.sample == sample)]
        if dropped:
            gone = {id(s) for s in dropped}
            state.running[:] = [s for s in state.running if id(s) not in gone]
        for s in dropped:
            self.cache.release(s.pages)
            job.live -= 1
        if job.live <= 0:
            state.jobs.pop(rid, None)
        self.stats["cancelled"] += len(dropped)
        return len(dropped)

    def step(self) -> int:
        """Admit what fits, prefill it, and run one decode forward over all running sequences (listeners are called
        from here). Returns the number of sequences that forward ran."""
        with torch.inference_mode():
            decoding = self.engine._tick(self.state)
        if decoding:
            stats = self.stats
            requests = len({s.request for s in decoding})
            stats["steps"] += 1
            stats["max_batch"] = max(stats["max_batch"], len(decoding))
            stats["max_batch_requests"] = max(stats["max_batch_requests"], requests)
            stats["batched_steps"] += requests > 1
        self.stats["tokens"] = self.state.num_logprobs
        return len(decoding)

    def close(self) -> None:
        """Drop every request and free the engine for rollouts (the cache stays allocated)."""
        for rid in list(self.state.jobs):
            self.cancel(rid)
        self.cache.reset()
        if self.engine._stream is self:
            self.engine._stream = None


def _seed(seed: int, request: int, sample: int) -> int:
    """A distinct stream per (run seed, request, sample), independent of scheduling."""
    return (seed * 1_000_003 + request) * 1_009 + sample
