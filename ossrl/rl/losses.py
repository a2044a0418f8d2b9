"""Policy losses on token tensors [B, T] (or packed [M] with ``seq_index``, see ``ossrl.rl.masked``) with a loss
mask and per-sequence advantages [B].

Every loss takes ``logprobs`` (current policy, with grad), ``old_logprobs`` (the policy that produced the data;
detached), ``advantages`` [B] and ``mask`` (1 on sampled tokens), and returns ``(loss, metrics)``: a scalar to
minimise and a dict of detached 0-d tensors (call ``.item()`` when logging, not every step). Maths runs in fp32.
``is_weights`` [B, T] (optional, detached) multiplies the per-token loss before aggregation: the truncated
importance weights of ``ossrl.rl.mismatch`` go there. ``agg``/``max_len``/``normalizer``: see ``ossrl.rl.masked``.

Notation: r_t = exp(logp_t - old_logp_t), A the sequence's advantage, sg = stop-gradient.
    ppo    l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))          (DAPO clip-higher: eps_high > eps_low)
           dual clip (Ye et al. 2019), A < 0 only: l_t = min(l_t, -A c)
    gspo   s = exp(mean_t (logp_t - old_logp_t)) per sequence; token form s_t = sg(s) * exp(logp_t - sg(logp_t)),
           l_t = max(-A s_t, -A clip(s_t, 1 - eps_low, 1 + eps_high)), default agg seq-mean-token-mean, so that
           grad = -A s (1/|y|) sum_t grad logp_t unless the sequence is clipped (GSPO, arXiv:2507.18071)
    cispo  l_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A logp_t           (MiniMax-M1, arXiv:2506.13585)
    pg     l_t = -A logp_t                                                      (vanilla REINFORCE)

Strict on-policy convention: when one optimiser step is taken per rollout batch, pass
``old_logprobs = on_policy_old_logprobs(logprobs)`` (= ``logprobs.detach()``) from the same forward pass. Then
r_t == 1 exactly, nothing is clipped, and the gradient is exactly the vanilla policy gradient, even if a second
forward pass would differ (MoE routing, kernels). Sampler/trainer mismatch is corrected separately (is_weights).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ossrl.rl.masked import (
    aggregate,
    check_seq_tensor,
    check_token_tensors,
    masked_max,
    masked_mean,
    num_rows,
    per_token,
    row_sum,
)

MAX_LOG_RATIO = 20.0  # log-ratios are clamped to +-20 before exp, so exp never overflows fp32
Metrics = dict[str, torch.Tensor]


def on_policy_old_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Old log-probs for strict on-policy training: ``logprobs.detach()``, so the ratio is exactly 1."""
    return logprobs.detach()


def _prepare(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_weights: torch.Tensor | None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate; return (bool mask, fp32 logp, fp32 old logp, advantages per token ([B, 1] or [M]), weights),
    zeroed off-mask."""
    m = check_token_tensors(mask, seq_index, logprobs=logprobs, old_logprobs=old_logprobs, is_weights=is_weights)
    check_seq_tensor("advantages", advantages, num_rows(m, seq_index, num_seqs))
    zero = logprobs.new_zeros((), dtype=torch.float32)
    lp = torch.where(m, logprobs.float(), zero)
    old = lp.detach() if old_logprobs is None else torch.where(m, old_logprobs.detach().float(), zero)
    adv = per_token(advantages.detach().float(), seq_index)
    w = None if is_weights is None else torch.where(m, is_weights.detach().float(), zero)
    return m, lp, old, adv, w


def _check_eps(eps_low: float | None, eps_high: float | None) -> None:
    if eps_low is not None and not 0 <= eps_low <= 1:
        raise ValueError(f"eps_low must be in [0, 1]; got {eps_low}")
    if eps_high is not None and eps_high < 0:
        raise ValueError(f"eps_high must be >= 0; got {eps_high}")


def _clip_max(pg_unclipped: torch.Tensor, pg_clipped: torch.Tensor) -> torch.Tensor:
    """max of the two; on a tie the unclipped branch carries the gradient (so ratio 1 gives the plain PG)."""
    return torch.where(pg_clipped > pg_unclipped, pg_clipped, pg_unclipped)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO-clip with decoupled eps_low / eps_high (DAPO defaults 0.2 / 0.28) and optional dual clip c > 1.

    Metrics (over sampled tokens): clip_frac_low (A < 0, r < 1 - eps_low), clip_frac_high (A > 0,
    r > 1 + eps_high), dual_clip_frac (A < 0, r > c), ratio_mean, ratio_max, approx_kl (k3 of KL(old || new)).
    Clipped tokens contribute no gradient.
    """
    _check_eps(eps_low, eps_high)
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1; got {dual_clip}")
    layout = {"seq_index": seq_index, "num_seqs": advantages.shape[0] if seq_index is not None else None}
    m, lp, old, adv, w = _prepare(logprobs, old_logprobs, advantages, mask, is_weights, **layout)
    log_ratio = (lp - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    pg = _clip_max(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    dual = torch.zeros_like(m)
    if dual_clip is not None:
        pg_dual = -adv * dual_clip
        dual = (adv < 0) & (pg > pg_dual)
        pg = torch.where(dual, pg_dual, pg)
    if w is not None:
        pg = pg * w
    loss = aggregate(pg, m, agg, max_len=max_len, normalizer=normalizer, **layout)
    with torch.no_grad():
        metrics = {
            "clip_frac_low": masked_mean(((adv < 0) & (ratio < 1 - eps_low)).float(), m),
            "clip_frac_high": masked_mean(((adv > 0) & (ratio > 1 + eps_high)).float(), m),
            "dual_clip_frac": masked_mean(dual.float(), m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": masked_max(ratio, m),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, m),
        }
    return loss, metrics


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO: sequence-level ratio s = exp(mean_t log r_t), clipped per sequence (paper defaults 3e-4 / 4e-4).

    Metrics over sequences with at least one sampled token: clip_frac_low (A < 0, s < 1 - eps_low),
    clip_frac_high (A > 0, s > 1 + eps_high), ratio_mean and ratio_max of s; approx_kl over tokens as in PPO.
    """
    _check_eps(eps_low, eps_high)
    layout = {"seq_index": seq_index, "num_seqs": advantages.shape[0] if seq_index is not None else None}
    m, lp, old, adv, w = _prepare(logprobs, old_logprobs, advantages, mask, is_weights, **layout)
    n_tok = row_sum(m.long(), m, **layout)
    seq_log_ratio = (row_sum(lp - old, m, **layout) / n_tok.clamp(min=1)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    seq_log_ratio = seq_log_ratio.detach()
    s_tok = torch.exp(lp - lp.detach() + per_token(seq_log_ratio, seq_index))  # value s, d s_t / d logp_t = s
    pg = _clip_max(-adv * s_tok, -adv * s_tok.clamp(1 - eps_low, 1 + eps_high))
    if w is not None:
        pg = pg * w
    loss = aggregate(pg, m, agg, max_len=max_len, normalizer=normalizer, **layout)
    with torch.no_grad():
        s, a, seqs = seq_log_ratio.exp(), advantages.detach().float(), n_tok > 0
        tok_log_ratio = (lp - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        metrics = {
            "clip_frac_low": masked_mean(((a < 0) & (s < 1 - eps_low)).float(), seqs),
            "clip_frac_high": masked_mean(((a > 0) & (s > 1 + eps_high)).float(), seqs),
            "ratio_mean": masked_mean(s, seqs),
            "ratio_max": masked_max(s, seqs),
            "approx_kl": masked_mean(tok_log_ratio.exp() - 1 - tok_log_ratio, m),
        }
    return loss, metrics


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float | None = None,
    eps_high: float = 4.0,
    agg: str = "token-mean",
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO: -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A logp_t. No token loses its gradient.

    Defaults: no lower bound (eps_low=None, as MiniMax-M1), weight capped at 1 + eps_high = 5 (NeMo RL's recipe).
    Metrics over tokens: clip_frac_low / clip_frac_high (weight truncated below / above), ratio_mean, ratio_max,
    approx_kl.
    """
    _check_eps(eps_low, eps_high)
    layout = {"seq_index": seq_index, "num_seqs": advantages.shape[0] if seq_index is not None else None}
    m, lp, old, adv, w = _prepare(logprobs, old_logprobs, advantages, mask, is_weights, **layout)
    log_ratio = (lp - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio).detach()
    lo = None if eps_low is None else 1 - eps_low
    pg = -ratio.clamp(min=lo, max=1 + eps_high) * adv * lp
    if w is not None:
        pg = pg * w
    loss = aggregate(pg, m, agg, max_len=max_len, normalizer=normalizer, **layout)
    with torch.no_grad():
        low = ratio < lo if lo is not None else torch.zeros_like(m)
        metrics = {
            "clip_frac_low": masked_mean(low.float(), m),
            "clip_frac_high": masked_mean((ratio > 1 + eps_high).float(), m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": masked_max(ratio, m),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, m),
        }
    return loss, metrics


def pg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    agg: str = "token-mean",
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Vanilla policy gradient (REINFORCE): l_t = -A logp_t, no ratio and no clipping (``old_logprobs`` only feed
    the metrics ratio_mean, ratio_max and approx_kl)."""
    layout = {"seq_index": seq_index, "num_seqs": advantages.shape[0] if seq_index is not None else None}
    m, lp, old, adv, w = _prepare(logprobs, old_logprobs, advantages, mask, is_weights, **layout)
    pg = -adv * lp
    if w is not None:
        pg = pg * w
    loss = aggregate(pg, m, agg, max_len=max_len, normalizer=normalizer, **layout)
    with torch.no_grad():
        log_ratio = (lp - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        ratio = log_ratio.exp()
        metrics = {
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": masked_max(ratio, m),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, m),
        }
    return loss, metrics


PolicyLoss = Callable[..., tuple[torch.Tensor, Metrics]]
POLICY_LOSSES: dict[str, PolicyLoss] = {"ppo": ppo_clip_loss, "gspo": gspo_loss, "cispo": cispo_loss, "pg": pg_loss}


def get_policy_loss(name: str) -> PolicyLoss:
    """The loss called ``name`` ("ppo" | "gspo" | "cispo" | "pg"); all take (logprobs, old_logprobs, advantages,
    mask)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; expected one of {tuple(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]
