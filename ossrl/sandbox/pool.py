"""Many sandboxed runs at once from async code (rollouts call tools concurrently).

Each run is still a fresh process; the pool only bounds how many run together (an asyncio.Semaphore in front of a
thread pool of the same size, since run_python blocks while it watches its child).
"""

from __future__ import annotations

import asyncio
import functools
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ossrl.sandbox.result import SandboxResult
from ossrl.sandbox.runner import run_python


class Sandbox:
    """`async with Sandbox(max_concurrency=8, timeout_s=5) as sb: r = await sb.run(code)`.

    Keyword arguments are defaults for every run (any `run_python` option); `run(..., **kw)` overrides them.
    A cancelled `run` stops waiting at once; the child is still bounded by its own timeout.
    """

    def __init__(self, max_concurrency: int | None = None, **defaults: Any) -> None:
        self.max_concurrency = max_concurrency or os.cpu_count() or 4
        self.defaults = defaults
        self._executor = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="ossrl-sandbox")
        # One semaphore per event loop: a semaphore is bound to the loop it first waited in.
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    async def run(self, code: str, **kwargs: Any) -> SandboxResult:
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.setdefault(loop, asyncio.Semaphore(self.max_concurrency))
        async with semaphore:
            call = functools.partial(run_python, code, **{**self.defaults, **kwargs})
            return await loop.run_in_executor(self._executor, call)

    def run_sync(self, code: str, **kwargs: Any) -> SandboxResult:
        return run_python(code, **{**self.defaults, **kwargs})

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)


_default: Sandbox | None = None


async def run_python_async(code: str, **kwargs: Any) -> SandboxResult:
    """run_python for async callers, through a process-wide pool of os.cpu_count() concurrent runs."""
    global _default
    if _default is None:
        _default = Sandbox()
    return await _default.run(code, **kwargs)
