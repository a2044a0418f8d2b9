"""Helpers every kernel module shares. A leaf: it imports nothing from ``ossrl``, so any module can import it
(kernel modules import these from here, never from the ``ossrl.kernels`` package, which imports them)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("ossrl.kernels")
_warned: set[str] = set()


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1): the tests' way to run them on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen (a fallback is logged once, loudly)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
