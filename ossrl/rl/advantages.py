"""Outcome advantages for groups of completions of the same prompt (one scalar reward per completion).

Inputs: ``rewards`` [N] with integer ``group_ids`` [N] (any ids, any order), or ``rewards`` [G, n] with
``group_ids=None`` (row g is group g). The result has the shape of ``rewards``.

For a group with rewards r_1..r_n, mean m and unbiased std s (Bessel, as torch.std, TRL and verl):
    grpo      A_i = (r_i - m) / (s + eps)                     (DeepSeekMath GRPO; scale="group")
    dr_grpo   A_i = r_i - m                                   (Dr.GRPO: no std division; scale="none")
    rloo      A_i = r_i - (sum_j r_j - r_i) / (n - 1) = n / (n - 1) * (r_i - m)   (leave-one-out baseline)
``scale`` picks the divisor: "group" (s of the group), "batch" (std of all N rewards: group mean, batch std, as
TRL's scale_rewards="batch"), or "none". A group of one has no baseline: its advantage is 0 under every estimator.
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def make_group_ids(num_groups: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Group ids [G * n] for ``num_groups`` consecutive groups of ``group_size``: 0,0,..,1,1,.. ."""
    if num_groups < 0 or group_size <= 0:
        raise ValueError(f"need num_groups >= 0 and group_size > 0; got {num_groups}, {group_size}")
    return torch.arange(num_groups, device=device).repeat_interleave(group_size)


def _flatten(rewards: torch.Tensor, group_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rewards [N] as float, dense group index [N] in 0..G-1, G)."""
    if group_ids is None:
        if rewards.dim() != 2:
            raise ValueError(f"without group_ids, rewards must be [G, n]; got shape {tuple(rewards.shape)}")
        g, n = rewards.shape
        return _as_float(rewards.reshape(-1)), make_group_ids(g, n, rewards.device), g
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor; got {group_ids.dtype}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return _as_float(rewards), inverse.to(rewards.device), uniq.numel()


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.float()


def _group_stats(r: torch.Tensor, idx: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group mean, group unbiased std, group size); std of a group of one is 0."""
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, r) / count.clamp(min=1)
    dev = r - mean[idx]
    var = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, dev * dev) / (count - 1).clamp(min=1)
    return mean[idx], var.sqrt()[idx], count[idx]


def _scale(adv: torch.Tensor, r: torch.Tensor, group_std: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    if scale == "group":
        return adv / (group_std + eps)
    if scale == "batch":
        batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
        return adv / (batch_std + eps)
    if scale == "none":
        return adv
    raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")


def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: A_i = (r_i - group mean) / (std + eps), std per ``scale`` ("group" | "batch" | "none")."""
    r, idx, g = _flatten(rewards, group_ids)
    mean, std, _ = _group_stats(r, idx, g)
    return _scale(r - mean, r, std, scale, eps).reshape(rewards.shape)


def dr_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Dr.GRPO: A_i = r_i - group mean (no std division)."""
    return grpo_advantages(rewards, group_ids, scale="none")


def rloo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *, scale: str = "none", eps: float = 1e-6
) -> torch.Tensor:
    """RLOO: A_i = r_i - mean of the other n-1 rewards of its group = n/(n-1) (r_i - mean); 0 for n = 1."""
    r, idx, g = _flatten(rewards, group_ids)
    mean, std, count = _group_stats(r, idx, g)
    adv = (r - mean) * count / (count - 1).clamp(min=1)
    return _scale(adv, r, std, scale, eps).reshape(rewards.shape)


def compute_advantages(
    estimator: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    scale: str | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Dispatch by name: "grpo" (default scale "group"), "dr_grpo" (scale "none" only), "rloo" (default "none")."""
    if estimator == "grpo":
        return grpo_advantages(rewards, group_ids, scale=scale or "group", eps=eps)
    if estimator == "dr_grpo":
        if scale not in (None, "none"):
            raise ValueError(f"dr_grpo does not scale advantages; got scale={scale!r} (use grpo with a scale)")
        return dr_grpo_advantages(rewards, group_ids)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_ids, scale=scale or "none", eps=eps)
    raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
