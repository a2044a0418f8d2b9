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


# Deterministic mode (``ossrl.deterministic()``): every dispatch point reads this flag and, when it is set, runs the
# batch-invariant version of its op (``ossrl.kernels.batch_invariant``). A process-wide flag, like
# ``torch.use_deterministic_algorithms``: the engine's and the trainer's threads see the same mode.
_deterministic = False


def deterministic_enabled() -> bool:
    """Whether the kernels run their batch-invariant versions (``ossrl.deterministic()``)."""
    return _deterministic


def set_deterministic_flag(enabled: bool) -> bool:
    """Set deterministic mode on or off; returns the previous setting."""
    global _deterministic
    previous, _deterministic = _deterministic, bool(enabled)
    return previous
