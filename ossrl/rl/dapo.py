"""DAPO extras: dynamic-sampling group filter and soft overlong punishment (Yu et al. 2025, arXiv:2503.14476)."""

from __future__ import annotations

import torch

from ossrl.rl.advantages import _flatten


def filter_groups(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *, atol: float = 0.0) -> torch.Tensor:
    """Which groups to keep: those whose rewards are not all equal (max - min > atol).

    DAPO's dynamic sampling keeps groups with 0 < #correct < n; for any reward, "all equal" is the case where
    every group-relative advantage is zero. A group of one is all equal, so it is dropped too (verl keeps those).
    Returns a bool mask: per sample [N] for ``rewards`` [N] with ``group_ids``, per group [G] for ``rewards`` [G, n].
    """
    r, idx, g = _flatten(rewards, group_ids)
    hi = torch.full((g,), float("-inf"), dtype=r.dtype, device=r.device).scatter_reduce(0, idx, r, "amax")
    lo = torch.full((g,), float("inf"), dtype=r.dtype, device=r.device).scatter_reduce(0, idx, r, "amin")
    keep = (hi - lo) > atol
    return keep if group_ids is None else keep[idx]


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, *, penalty: float = 1.0) -> torch.Tensor:
    """Soft overlong punishment (DAPO eq. 13) times ``penalty``, added to the task reward. E = max_len - buffer_len:
    0 if L <= E;  (E - L) / buffer_len if E < L <= max_len (linear from 0 to -1);  -1 if L > max_len.
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len; got buffer_len={buffer_len}, max_len={max_len}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0; got {penalty}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor; got {lengths.dtype}")
    over = (lengths - (max_len - buffer_len)).float() / buffer_len
    return -penalty * over.clamp(min=0.0, max=1.0)
