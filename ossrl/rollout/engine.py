"""The rollout engine: generation from the policy model itself (same object, same weights, LoRA unmerged).

Continuous batching: requests wait in a queue; a sequence is admitted when the KV cache can hold its longest
possible life (prompt + sampled tokens + tool results), so an admitted sequence never stalls for memory. Each loop
prefills newly admitted prompts (varlen kernel, one prefill shared by a request's n samples) and then runs ONE
forward over every running sequence (paged decode kernel), which also carries tool results being appended.
Sampling depends only on (logits, seed, position), so a sequence's tokens do not depend on its batch-mates.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ossrl.model.gpt_oss import GptOss, PackedBatch
from ossrl.rollout.graphs import DecodeGraphs
from ossrl.rollout.kv_cache import CacheStep, PagedKVCache, SequencePages, sliding_pages_per_sequence, to_device
from ossrl.rollout.sampling import SamplingParams, sample_tokens
from ossrl.rollout.tools import ToolRunner, Tools

FINISH_REASONS = ("stop", "length", "tool_call", "error")


@dataclass
class Request:
    """A prompt (token ids, e.g. from ``ossrl.harmony.render_conversation``) and how many samples to draw."""

    prompt_ids: list[int]
    n: int = 1


@dataclass
class Completion:
    """One sample. ``token_ids`` are all tokens after the prompt: sampled ones (``loss_mask`` 1) and, in multi-turn
    episodes, tool-result tokens the engine appended (``loss_mask`` 0). ``logprobs`` has one float per token: the
    sampler's log-prob, log_softmax(logits / T), for sampled tokens, and 0.0 for appended ones."""

    token_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    finish_reason: str
    num_tool_calls: int = 0
    tool_errors: int = 0
    error: str | None = None
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def sampled_ids(self) -> list[int]:
        return [t for t, m in zip(self.token_ids, self.loss_mask, strict=True) if m]


@dataclass(eq=False)  # identity: sequences are compared and removed as objects
class _Seq:
    request: int
    sample: int
    seed: int
    prompt: list[int]
    pages: SequencePages
    pending: list[int]  # tokens to feed to the model next (the prompt, the last sampled token, a tool result)
    new: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turn_start: int = 0  # index in `new` where the current assistant turn begins
    sampled: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    start_time: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.new)


class Engine:
    """Generate from a ``GptOss`` model.

    ``kv_cache_tokens``: tokens the full-attention layers' cache holds over all running sequences (default: 90%
    of free GPU memory on CUDA, 65,536 on CPU). ``max_num_seqs`` bounds the decode batch, ``max_prefill_tokens``
    the tokens of one prefill forward. ``tokenizer`` (with Harmony tokens) is needed for tool calls and supplies
    the default stop tokens. ``cuda_graphs=True``: decode steps run from fixed-size buffers, replayed from CUDA
    graphs on a GPU (``ossrl.rollout.graphs``); on CPU the fixed-buffer step runs without capture. Off by default
    until it has been measured on a GPU. ``torch_compile=True`` (or a backend name) compiles that step with
    ``torch.compile`` (one compile per batch bucket; with ``cuda_graphs`` the graphs capture the compiled step).
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
        cuda_graphs: bool = False,
        torch_compile: bool | str = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.page_size = page_size
        self.kv_cache_tokens = kv_cache_tokens
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.cuda_graphs = cuda_graphs
        self.compile_backend = ("inductor" if torch_compile is True else torch_compile) or None
        self._graphs: DecodeGraphs | None = None
        self.graph_buckets: dict[int, bool] = {}  # last generate call: decode bucket -> captured in a CUDA graph
        self.harmony = None
        self._cache: PagedKVCache | None = None
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

    @torch.inference_mode()
    def generate(
        self, requests: list[Request], sampling: SamplingParams, tools: Tools | None = None
    ) -> list[list[Completion]]:
        """Per request, ``n`` completions. With ``tools`` (name -> callable or async callable taking the call's
        JSON arguments as keyword arguments), a completion that ends in a Harmony tool call gets the tool's result
        appended and continues, up to ``sampling.max_turns`` assistant turns."""
        vocab = self.model.config.vocab_size
        sampling.validate(vocab)
        stop_ids = set(sampling.stop_token_ids if sampling.stop_token_ids is not None else self.default_stop_ids())
        if tools and self.harmony is None:
            raise ValueError("tool calls need the Engine's tokenizer (Engine(model, tokenizer))")
        results: list[list[Completion | None]] = [[None] * r.n for r in requests]
        runner = ToolRunner(tools or {}, self.tokenizer, sampling) if tools else None
        max_chunk = sampling.max_tool_tokens + 64 if tools else 1
        reserve = sampling.max_new_tokens + (sampling.max_turns - 1) * max_chunk
        cache = self._cache = self._make_cache(max_chunk, max((r.n for r in requests), default=1))
        queue: deque[int] = deque()
        for i, request in enumerate(requests):
            problem = self._check_request(request, vocab, reserve, cache, max_chunk)
            if problem:
                results[i] = [Completion([], [], [], "error", error=problem) for _ in range(max(request.n, 1))]
            else:
                queue.append(i)
        running: list[_Seq] = []
        waiting_tools: dict[int, _Seq] = {}
        if (self.cuda_graphs or self.compile_backend) and queue:  # both run the fixed-buffer decode step
            longest = max(min(len(requests[i].prompt_ids) + reserve, self.max_model_len) for i in queue)
            self._graphs = DecodeGraphs(self.model, cache, sampling, max_batch=self.max_num_seqs,
                                        width=cache.pages_for(longest, self.page_size),
                                        capture=self.cuda_graphs and self.model.device.type == "cuda",
                                        compile_backend=self.compile_backend)  # fmt: skip
        try:
            while queue or running or waiting_tools:
                admitted = self._admit(queue, requests, running, cache, reserve, max_chunk, sampling)
                if not admitted and queue and not running and not waiting_tools:  # cannot happen: checked up front
                    raise RuntimeError(f"rollout engine: request {queue[0]} can never be admitted")
                if admitted:
                    self._prefill(admitted, cache, sampling, stop_ids, running, waiting_tools, results, runner)
                if runner is not None:
                    for seq in runner.collect(waiting_tools, block=not running and not queue):
                        if seq.length > self.max_model_len:
                            self._finish(seq, "length", results)
                        else:
                            running.append(seq)
                decoding = [s for s in running if s.pending]
                if decoding:
                    self._step(decoding, cache, sampling, stop_ids, running, waiting_tools, results, runner)
                elif not queue and not waiting_tools and running:
                    raise RuntimeError("rollout engine: running sequences with nothing to feed")  # a bug, not input
        finally:
            self.graph_buckets = self._graphs.captured if self._graphs is not None else {}
            self._cache = self._graphs = None  # the cache's memory goes back (the trainer needs it between rollouts)
            if runner is not None:
                runner.close()
        return [[c for c in group if c is not None] for group in results]  # type: ignore[misc]

    # ---- scheduling --------------------------------------------------------------------------------------------
    def _make_cache(self, max_chunk: int, max_group: int) -> PagedKVCache:
        config, device, dtype = self.model.config, self.model.device, self.model.dtype
        tokens = self.kv_cache_tokens
        n_full = sum(t == "full_attention" for t in config.layer_types)
        per_token = 2 * config.num_key_value_heads * config.head_dim * torch.finfo(dtype).bits // 8
        if tokens is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                sliding_tokens = config.sliding_window + max_chunk + 2 * self.page_size
                sliding_bytes = max(self.max_num_seqs, max_group) * sliding_tokens * per_token
                sliding_bytes *= config.num_hidden_layers - n_full
                tokens = int((0.9 * free - sliding_bytes) / max(1, per_token * n_full))
            else:
                tokens = 65536
        full_pages = max(1, tokens // self.page_size)
        sliding_pages = 0
        if "sliding_attention" in config.layer_types:
            per_seq = sliding_pages_per_sequence(config.sliding_window, self.page_size, max_chunk)
            sliding_pages = max(self.max_num_seqs, max_group) * per_seq
        return PagedKVCache(
            config, full_pages=full_pages, sliding_pages=sliding_pages, page_size=self.page_size, device=device,
            dtype=dtype,
        )  # fmt: skip

    def _check_request(
        self, request: Request, vocab: int, reserve: int, cache: PagedKVCache, max_chunk: int
    ) -> str | None:
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
        if not cache.fits_ever(max_len, max_chunk, copies=request.n):
            return (f"{request.n} sequence(s) of up to {max_len} tokens can never fit the KV cache; raise "
                    "kv_cache_tokens")  # fmt: skip
        if len(request.prompt_ids) > self.max_prefill_tokens:
            return f"prompt of {len(request.prompt_ids)} tokens exceeds max_prefill_tokens ({self.max_prefill_tokens})"
        return None

    def _admit(self, queue, requests, running, cache, reserve, max_chunk, sampling) -> list[list[_Seq]]:
        """Admit whole requests (all n samples) in order while the cache, batch and prefill budgets allow."""
        admitted: list[list[_Seq]] = []
        budget = self.max_prefill_tokens
        while queue:
            i = queue[0]
            request = requests[i]
            max_len = min(len(request.prompt_ids) + reserve, self.max_model_len)
            if len(running) + request.n > self.max_num_seqs and running:
                break
            if len(request.prompt_ids) > budget:
                break
            pages = []
            for _ in range(request.n):
                p = cache.admit(max_len, max_chunk)
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
            group = [
                _Seq(i, j, _seed(sampling.seed, i, j), list(request.prompt_ids), p, [], start_time=now)
                for j, p in enumerate(pages)
            ]
            group[0].pending = list(request.prompt_ids)
            admitted.append(group)
        return admitted

    # ---- forwards ----------------------------------------------------------------------------------------------
    def _forward(self, seqs: list[_Seq], cache: PagedKVCache, fresh: bool) -> torch.Tensor:
        """One forward over the pending tokens of ``seqs``; returns the logits of each sequence's last token."""
        q_lens = [len(s.pending) for s in seqs]
        device = self.model.device
        ids = to_device([t for s in seqs for t in s.pending], torch.long, device)
        positions = [p for s in seqs for p in range(s.pages.cached_len, s.pages.cached_len + len(s.pending))]
        positions = to_device(positions, torch.long, device)
        step = CacheStep(cache, [s.pages for s in seqs], q_lens, fresh)
        batch = PackedBatch(ids, step.cu_q_lens, step.max_q_len, positions, kv_cache=step)
        hidden = self.model.forward_packed(batch)
        step.finish([s.pages for s in seqs], q_lens)
        if step.max_q_len > 1:  # a decode step's rows are already one per sequence
            hidden = hidden[step.cu_q_lens[1:].long() - 1]
        for s in seqs:
            s.pending = []
        return self.model.lm_head(hidden).float()

    def _prefill(self, groups, cache, sampling, stop_ids, running, waiting_tools, results, runner) -> None:
        leaders = [g[0] for g in groups]
        logits = self._forward(leaders, cache, fresh=True)
        seqs, rows = [], []
        for row, group in enumerate(groups):
            for follower in group[1:]:
                cache.copy_pages(group[0].pages, follower.pages)
            seqs.extend(group)
            rows.extend([row] * len(group))
        self._sample_and_route(seqs, logits[rows], sampling, stop_ids, running, waiting_tools, results, runner)

    def _step(self, seqs, cache, sampling, stop_ids, running, waiting_tools, results, runner) -> None:
        stepped = {id(s) for s in seqs}
        graphs = self._graphs
        if graphs is not None and graphs.fits(len(seqs)) and all(len(s.pending) == 1 for s in seqs):
            ids = [s.pending[0] for s in seqs]
            for s in seqs:
                s.pending = []
            tokens, logprobs = graphs.step([s.pages for s in seqs], ids, [s.seed for s in seqs],
                                           [s.length for s in seqs])  # fmt: skip
            running[:] = [s for s in running if id(s) not in stepped]
            self._route(seqs, tokens, logprobs, sampling, stop_ids, running, waiting_tools, results, runner)
            return
        logits = self._forward(seqs, cache, fresh=False)  # a tool result being appended, or no graphs
        running[:] = [s for s in running if id(s) not in stepped]
        self._sample_and_route(seqs, logits, sampling, stop_ids, running, waiting_tools, results, runner)

    def _sample_and_route(self, seqs, logits, sampling, stop_ids, running, waiting_tools, results, runner) -> None:
        device = logits.device
        seeds = to_device([s.seed for s in seqs], torch.long, device)
        positions = to_device([s.length for s in seqs], torch.long, device)
        tokens, logprobs = sample_tokens(logits, sampling, seeds, positions)
        self._route(seqs, tokens.tolist(), logprobs.tolist(), sampling, stop_ids, running, waiting_tools, results,
                    runner)  # fmt: skip

    def _route(self, seqs, tokens, logprobs, sampling, stop_ids, running, waiting_tools, results, runner) -> None:
        """Record each sequence's sampled token; finish it, hand it to its tool, or keep it running."""
        for s, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            s.new.append(token)
            s.logprobs.append(logprob)
            s.mask.append(1)
            s.sampled += 1
            reason = None
            if token in stop_ids:
                is_call = self.harmony is not None and token == self.harmony.call
                if is_call and runner is not None and s.tool_calls < sampling.max_turns - 1:
                    s.tool_calls += 1
                    runner.submit(s, s.new[s.turn_start :])
                    waiting_tools[id(s)] = s
                    continue
                reason = "tool_call" if is_call else "stop"
            elif s.sampled >= sampling.max_new_tokens or s.length >= self.max_model_len:
                reason = "length"
            if reason is None:
                s.pending = [token]
                running.append(s)
            else:
                self._finish(s, reason, results)

    def _finish(self, s: _Seq, reason: str, results) -> None:
        results[s.request][s.sample] = Completion(
            s.new, s.logprobs, s.mask, reason, s.tool_calls, s.tool_errors,
            timing={"seconds": time.perf_counter() - s.start_time, "sampled_tokens": s.sampled},
        )  # fmt: skip
        self._cache.release(s.pages)


def _seed(seed: int, request: int, sample: int) -> int:
    """A distinct stream per (run seed, request, sample), independent of scheduling."""
    return (seed * 1_000_003 + request) * 1_009 + sample
