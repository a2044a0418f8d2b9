"""Helpers every kernel module shares. A leaf: it imports nothing from ``ossrl``, so any module can import it
(kernel modules import these from here, never from the ``ossrl.kernels`` package, which imports them)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


# Planning mode (``ossrl memory``, ``ossrl.memory``): the model runs on shape-only tensors of the "meta" device, which
# stands for the GPU being planned for. Dispatch points treat meta like CUDA (``planned_gpu``), probes and self-checks
# answer "works" without running anything, and Triton kernels allocate their outputs and workspaces but launch
# nothing, so the planner sees the memory of the GPU path (never the O(N^2) reference attention).
_planning = False


def planning() -> bool:
    """Whether kernels run in planning mode (shape-only tensors; see ``planned_gpu``)."""
    return _planning


def planned_gpu(device: torch.device) -> bool:
    """Whether ``device`` is the planned GPU: the meta device, in planning mode."""
    return _planning and device.type == "meta"


@contextlib.contextmanager
def planning_mode() -> Iterator[None]:
    """Planning mode for the duration of the block (a process-wide flag, like ``deterministic``)."""
    global _planning
    previous, _planning = _planning, True
    try:
        yield
    finally:
        _planning = previous
