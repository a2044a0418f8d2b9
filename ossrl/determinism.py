"""Deterministic mode: ``with ossrl.deterministic():`` (or ``ossrl.set_deterministic(True)``, or ``deterministic: true``
in a training config).

Inside it every op the rollout engine and the trainer run is batch-invariant with one fixed reduction order
(``ossrl.kernels.batch_invariant``), so the numbers computed for a token depend only on that token's sequence: never
on the batch, the packing, the position in the pack, prefill vs decode, or how many tokens are in flight. The
engine's sampled-token log-probs then equal the trainer's (``ossrl.train.logprobs_of``, the loss's forward) bit for
bit, and ``mismatch/*`` reads 0. It costs speed (see the README); the default (fast) mode is untouched.

This module is a thin front: the flag lives in ``ossrl.kernels.common`` (what the dispatch points read).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ossrl.kernels.common import deterministic_enabled, set_deterministic_flag

__all__ = ["deterministic", "is_deterministic", "set_deterministic"]


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Run the block in deterministic mode (``enabled=False``: in the fast mode); the previous mode comes back after,
    even on error. Process-wide while it lasts (the engine's and the trainer's threads all see it)."""
    previous = set_deterministic_flag(enabled)
    try:
        yield
    finally:
        set_deterministic_flag(previous)


def set_deterministic(enabled: bool) -> bool:
    """Turn deterministic mode on or off for the process; returns the previous setting."""
    return set_deterministic_flag(enabled)


def is_deterministic() -> bool:
    return deterministic_enabled()
