"""One background thread that owns the model and drives an ``EngineStream``: continuous batching for the server.

HTTP handlers (any thread, typically the event loop's) ``submit`` requests and ``cancel`` them; the engine thread
applies those commands between steps, so a request that arrives while others decode joins the running batch at the
next step. The tokens each step samples are handed to each request's ``deliver`` callback once per step (a list of
:class:`Event`), from the engine thread: the callback must be quick and thread-safe (the server's puts them on an
asyncio queue with ``call_soon_threadsafe``).

Overload is refused, never queued without bound: ``submit`` raises :class:`Overloaded` when ``max_queue`` requests
are already waiting for admission (submitted, no token yet), and :class:`Unavailable` once the loop is stopped or its
thread died (every open request then gets an error event).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ossrl.rollout import Engine, Request, SamplingParams

log = logging.getLogger(__name__)


class Event(NamedTuple):
    """``token``: a sampled token of sample ``sample``; ``finish``: that sample ended (``stop`` / ``length`` /
    ``error``, then ``error`` holds the reason)."""

    sample: int
    token: int | None = None
    finish: str | None = None
    error: str | None = None


class Overloaded(RuntimeError):
    """Too many requests are waiting for admission (HTTP 429)."""


class Unavailable(RuntimeError):
    """The engine loop is stopped or its thread died (HTTP 503)."""


@dataclass(eq=False)
class Ticket:
    """A submitted request as the loop tracks it."""

    id: int
    request: Request
    sampling: SamplingParams
    deliver: Callable[[list[Event]], None]
    seed_key: int = 0
    rid: int | None = None  # the stream's id, once the engine thread has submitted it
    buffer: list[Event] = field(default_factory=list)
    open: set[int] = field(default_factory=set)  # samples not finished or cancelled


class EngineLoop:
    """Runs ``engine.stream()`` on a thread of its own. ``start()`` it, ``stop()`` it; ``paused()`` holds the engine
    between steps (e.g. to update the weights in place)."""

    def __init__(self, engine: Engine, *, max_queue: int = 256) -> None:
        if max_queue < 0:
            raise ValueError(f"EngineLoop: max_queue must be >= 0; got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.stream = engine.stream()
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._tickets: dict[int, Ticket] = {}  # open tickets by loop id
        self._pending: set[int] = set()  # submitted, not admitted yet (no event delivered)
        self._ids = itertools.count()
        self._pauses = 0
        self._idle = True  # the engine thread is waiting, between steps
        self._stopping = False
        self.dead: str | None = None  # why the engine thread died
        self._thread = threading.Thread(target=self._run, name="ossrl-engine", daemon=True)

    # ---- any thread --------------------------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread after its current step; open requests get an error event. The stream is closed."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: nothing else will close the stream
            self._shutdown("the server is shutting down")

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self.dead is None

    def check(self, request: Request, sampling: SamplingParams) -> str | None:
        """Why the request can never run on this engine, or None (thread-safe: reads only fixed limits)."""
        return self.stream.check(request, sampling)

    def submit(
        self, request: Request, sampling: SamplingParams, deliver: Callable[[list[Event]], None], *, seed_key: int = 0
    ) -> Ticket:
        """Queue a request; ``deliver`` gets its events, a list per engine step. Raises :class:`Overloaded` when
        ``max_queue`` requests already wait for admission, :class:`Unavailable` when the loop is not running."""
        with self._cond:
            if self.dead is not None or self._stopping:
                raise Unavailable(f"the engine is not running ({self.dead or 'shutting down'})")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"{len(self._pending)} requests are already waiting (max_queue={self.max_queue})")
            ticket = Ticket(next(self._ids), request, sampling, deliver, seed_key, open=set(range(max(request.n, 1))))
            self._tickets[ticket.id] = ticket
            self._pending.add(ticket.id)
            self._inbox.append(("submit", ticket))
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket, sample: int | None = None) -> None:
        """Drop a request (or one of its samples) at the next step; its ``deliver`` hears nothing more of it."""
        with self._cond:
            if ticket.id not in self._tickets:
                return
            if sample is None:
                self._pending.discard(ticket.id)
            self._inbox.append(("cancel", (ticket, sample)))
            self._cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the engine thread between two steps for the duration (requests keep queueing)."""
        with self._cond:
            self._pauses += 1
            self._cond.notify_all()
            while not self._idle and self._thread.is_alive():
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        """The stream's counters plus what is queued now (``pending``: submitted, not admitted)."""
        with self._cond:
            out: dict[str, Any] = dict(self.stream.stats)
            out.update(pending=len(self._pending), open_requests=len(self._tickets), running=self.stream.num_running,
                       waiting=self.stream.num_waiting, alive=self.running, max_queue=self.max_queue)  # fmt: skip
            if self.dead is not None:
                out["dead"] = self.dead
            return out

    # ---- the engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and (self._pauses or (not self._inbox and not self.stream.busy)):
                        self._idle = True
                        self._cond.notify_all()
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._idle = False
                    commands, self._inbox = self._inbox, []
                for kind, arg in commands:
                    self._submit(arg) if kind == "submit" else self._cancel(*arg)
                if self.stream.busy:
                    self.stream.step()
                self._flush()
        except BaseException as err:  # noqa: BLE001 (reported to every open request, then the loop is dead)
            log.exception("ossrl serve: the engine thread died")
            self.dead = f"{type(err).__name__}: {err}"
        finally:
            self._shutdown(self.dead or "the server is shutting down")

    def _submit(self, ticket: Ticket) -> None:
        def listener(sample: int, token: int | None, finish: str | None) -> None:
            ticket.buffer.append(Event(sample, token, finish))

        try:
            ticket.rid = self.stream.submit(ticket.request, ticket.sampling, listener, seed_key=ticket.seed_key)
        except ValueError as err:  # checked by the server before; a direct caller may not have
            ticket.buffer.extend(Event(j, None, "error", str(err)) for j in sorted(ticket.open))

    def _cancel(self, ticket: Ticket, sample: int | None) -> None:
        if ticket.rid is not None:
            self.stream.cancel(ticket.rid, sample)
        if sample is None:
            ticket.open.clear()
            ticket.buffer.clear()
        else:
            ticket.open.discard(sample)
            ticket.buffer[:] = [e for e in ticket.buffer if e.sample != sample]
        if not ticket.open:
            with self._cond:
                self._tickets.pop(ticket.id, None)
                self._pending.discard(ticket.id)

    def _flush(self) -> None:
        """Hand each request the events of this step (one call per request per step)."""
        with self._cond:
            tickets = [t for t in self._tickets.values() if t.buffer]
            for t in tickets:
                self._pending.discard(t.id)
                t.open.difference_update(e.sample for e in t.buffer if e.finish is not None)
                if not t.open:
                    del self._tickets[t.id]
        for t in tickets:
            events, t.buffer = t.buffer, []
            try:
                t.deliver(events)
            except Exception:  # noqa: BLE001 (a broken receiver must not stop the engine for everyone)
                log.exception("ossrl serve: delivering events failed")

    def _shutdown(self, reason: str) -> None:
        with self._cond:
            tickets, self._tickets = list(self._tickets.values()), {}
            self._pending.clear()
            self._inbox.clear()
            self._idle = True
            self._cond.notify_all()
        for t in tickets:
            try:
                t.deliver([Event(j, None, "error", reason) for j in sorted(t.open)])
            except Exception:  # noqa: BLE001
                log.exception("ossrl serve: delivering events failed")
        self.stream.close()
