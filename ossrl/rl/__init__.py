"""RL algorithms as pure tensor functions: advantages, policy losses, KL, DAPO extras, mismatch correction."""

from ossrl.rl.advantages import (
    ESTIMATORS,
    SCALES,
    compute_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    make_group_ids,
    rloo_advantages,
)
from ossrl.rl.dapo import filter_groups, overlong_penalty
from ossrl.rl.kl import KL_KINDS, entropy_bonus, kl_estimate, kl_loss
from ossrl.rl.losses import (
    POLICY_LOSSES,
    cispo_loss,
    get_policy_loss,
    gspo_loss,
    on_policy_old_logprobs,
    pg_loss,
    ppo_clip_loss,
)
from ossrl.rl.masked import AGG_MODES, aggregate, masked_mean, masked_sum
from ossrl.rl.mismatch import mismatch_metrics, sequence_is_mask, truncated_is_weights

__all__ = [
    "AGG_MODES",
    "ESTIMATORS",
    "KL_KINDS",
    "POLICY_LOSSES",
    "SCALES",
    "aggregate",
    "cispo_loss",
    "compute_advantages",
    "dr_grpo_advantages",
    "entropy_bonus",
    "filter_groups",
    "get_policy_loss",
    "grpo_advantages",
    "gspo_loss",
    "kl_estimate",
    "kl_loss",
    "make_group_ids",
    "masked_mean",
    "masked_sum",
    "mismatch_metrics",
    "on_policy_old_logprobs",
    "overlong_penalty",
    "pg_loss",
    "ppo_clip_loss",
    "rloo_advantages",
    "sequence_is_mask",
    "truncated_is_weights",
]
