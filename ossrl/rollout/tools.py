"""Running the tools a policy calls during a rollout, concurrently with the other sequences' decoding.

A sync tool runs in a thread pool, an async tool on a background event loop; the engine polls between decode
steps. Whatever goes wrong — a call that does not parse, an unknown tool, an exception, a timeout — becomes an
error message for the model to read, never an exception in the engine. (A timed-out sync tool's thread cannot be
killed; it is abandoned. Tools that run untrusted code should use ``ossrl.sandbox``, which enforces its own limits.)
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from ossrl.harmony import Message, parse_completion, render_messages
from ossrl.rollout.sampling import SamplingParams
from ossrl.rollout.sequence import RunningSequence

Tools = dict[str, Callable[..., Any] | Callable[..., Awaitable[Any]]]


class ToolRunner:
    def __init__(self, tools: Tools, tokenizer: Any, sampling: SamplingParams, max_workers: int = 16) -> None:
        self.tools = tools
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ossrl-tool")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: dict[int, tuple[Future, float, str]] = {}  # id(seq) -> (future, deadline, recipient)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, daemon=True, name="ossrl-tool-loop").start()
        return self.loop

    def submit(self, seq: RunningSequence, turn_tokens: list[int]) -> None:
        """Start the tool call that ends ``turn_tokens`` (the assistant turn just sampled, ``<|call|>`` included)."""
        parsed = parse_completion(turn_tokens, self.tokenizer)
        call = parsed.tool_call
        deadline = time.monotonic() + self.sampling.tool_timeout_s
        if call is None:
            self.pending[id(seq)] = (_done(f"error: could not read the tool call: {parsed.error}"), deadline, "")
            return
        fn = self.tools.get(call.recipient) or self.tools.get(call.name)
        if fn is None:
            message = f"error: unknown tool {call.recipient!r}; available: {sorted(self.tools)}"
            self.pending[id(seq)] = (_done(message), deadline, call.recipient)
            return
        if call.error and call.content_type == "json":
            self.pending[id(seq)] = (_done(f"error: bad arguments: {call.error}"), deadline, call.recipient)
            return
        args, kwargs = ((), call.arguments) if isinstance(call.arguments, dict) else ((call.raw_arguments,), {})
        if inspect.iscoroutinefunction(fn):
            future = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._event_loop())
        else:
            future = self.pool.submit(fn, *args, **kwargs)
        self.pending[id(seq)] = (future, deadline, call.recipient)

    def collect(self, waiting: dict[int, RunningSequence], block: bool) -> list[RunningSequence]:
        """Sequences whose tool finished (or timed out), with the result appended as tokens to feed next.
        ``block``: nothing else to do, so wait for the first result or deadline instead of returning empty."""
        if block and waiting:
            futures = [self.pending[k][0] for k in waiting]
            timeout = max(0.0, min(self.pending[k][1] for k in waiting) - time.monotonic())
            wait(futures, timeout=timeout, return_when="FIRST_COMPLETED")
        ready = []
        for key in list(waiting):
            future, deadline, recipient = self.pending[key]
            if future.done():
                text, failed = _result_text(future)
            elif time.monotonic() >= deadline:
                future.cancel()
                text, failed = f"error: tool timed out after {self.sampling.tool_timeout_s:g} s", True
            else:
                continue
            seq = waiting.pop(key)
            del self.pending[key]
            seq.tool_errors += failed
            self._append_result(seq, recipient or "functions.unknown", text)
            ready.append(seq)
        return ready

    def _append_result(self, seq: RunningSequence, recipient: str, text: str) -> None:
        result = render_messages([Message.tool_result(recipient, text, namespace="")], self.tokenizer)
        budget = self.sampling.max_tool_tokens
        if len(result) > budget:  # cut the content, keep the message well-formed
            head = render_messages([Message.tool_result(recipient, "", namespace="")], self.tokenizer)
            body = self.tokenizer.encode(text, add_special_tokens=False)[: max(0, budget - len(head))]
            result = render_messages(
                [Message.tool_result(recipient, self.tokenizer.decode(body) + " [truncated]", namespace="")],
                self.tokenizer,
            )
        seq.append_tool_result(result + render_messages([], self.tokenizer, add_generation_prompt=True))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)


def _done(text: str) -> Future:
    future: Future = Future()
    future.set_result(text)
    return future


def _result_text(future: Future) -> tuple[str, bool]:
    try:
        value = future.result()
    except Exception as err:  # noqa: BLE001 (a tool's failure is the model's to read, never the engine's)
        return f"error: {type(err).__name__}: {err}", True
    if isinstance(value, str):
        return value, value.startswith("error:")
    try:
        return json.dumps(value, ensure_ascii=False), False
    except (TypeError, ValueError):
        return str(value), False
