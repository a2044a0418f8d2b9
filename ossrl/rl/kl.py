"""KL to a reference policy and the entropy bonus, per token on [B, T] with a loss mask.

Tokens are sampled from the policy pi; with d = ref_logp - logp = log(pi_ref / pi) per token, Schulman's
estimators of KL(pi || pi_ref) (http://joschu.net/blog/kl-approx.html) are
    k1 = -d                 unbiased, high variance, can be negative
    k2 = d^2 / 2            biased, low variance, >= 0
    k3 = exp(d) - 1 - d     unbiased, low variance, >= 0   (GRPO's KL term; verl "low_var_kl")
d is clamped to +-20 before exp in k3.
"""

from __future__ import annotations

import torch

from ossrl.rl.masked import aggregate, check_token_tensors

KL_KINDS = ("k1", "k2", "k3")
MAX_LOG_RATIO = 20.0


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate (same shape as the inputs); gradient flows to ``logprobs`` only."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    d = ref_logprobs.detach().float() - logprobs.float()
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        d = d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "k3",
    agg: str = "token-mean",
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> torch.Tensor:
    """Aggregated KL(pi || pi_ref) estimate over sampled tokens; multiply by beta and add to the policy loss."""
    m = check_token_tensors(mask, seq_index, logprobs=logprobs, ref_logprobs=ref_logprobs)
    zero = logprobs.new_zeros((), dtype=torch.float32)
    lp = torch.where(m, logprobs.float(), zero)
    ref = torch.where(m, ref_logprobs.float(), zero)
    return aggregate(kl_estimate(lp, ref, kind), m, agg, max_len=max_len, normalizer=normalizer,
                     seq_index=seq_index, num_seqs=num_seqs)  # fmt: skip


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    *,
    agg: str = "token-mean",
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> torch.Tensor:
    """Loss term -coef * aggregate(entropy) given per-token entropies [B, T]; adding it rewards higher entropy."""
    m = check_token_tensors(mask, seq_index, entropy=entropy)
    return -coef * aggregate(entropy.float(), m, agg, max_len=max_len, normalizer=normalizer, seq_index=seq_index,
                             num_seqs=num_seqs)  # fmt: skip
