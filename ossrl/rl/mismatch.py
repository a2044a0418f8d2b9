"""Training-inference mismatch: trainer vs sampler log-probs of the same sampled tokens [B, T] with a mask.

Tokens were drawn from the sampler's distribution pi_s; the trainer computes pi_t on the same tokens. With
d_t = trainer_logp_t - sampler_logp_t:
    truncated IS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
        per-token weight w_t = min(exp(d_t), C), detached; multiply the policy loss by it (``is_weights=``).
        trainer_logprobs are the trainer's log-probs before the update (= logprobs.detach() when strict on-policy).
    sequence-level masked IS (geometric mean, as verl's "geometric" rejection sampling):
        rho = exp(mean_t d_t) per sequence; sequences with rho outside [lo, hi] are masked out of the loss.
"""

from __future__ import annotations

import math

import torch

from ossrl.rl.masked import check_seq_tensor, check_token_tensors, masked_max, masked_mean, num_rows, row_sum

MAX_LOG_RATIO = 20.0


def _log_ratio(
    trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask, d = trainer - sampler in fp32, detached, 0 off-mask)."""
    m = check_token_tensors(mask, seq_index, trainer_logprobs=trainer, sampler_logprobs=sampler)
    d = trainer.detach().float() - sampler.detach().float()
    return m, torch.where(m, d, torch.zeros((), dtype=d.dtype, device=d.device))


def truncated_is_weights(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float = 2.0,
    seq_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level truncated importance weights min(exp(trainer - sampler), cap), detached, 0 off-mask."""
    if cap <= 0:
        raise ValueError(f"cap must be > 0; got {cap}")
    m, d = _log_ratio(trainer_logprobs, sampler_logprobs, mask, seq_index)
    w = d.clamp(max=MAX_LOG_RATIO).exp().clamp(max=cap)
    return torch.where(m, w, torch.zeros_like(w))


def sequence_is_mask(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    hi: float = 1.001,
    lo: float | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level masked IS: (keep [B] bool, rho [B]) with rho = exp(mean over sampled tokens of d).

    keep = lo <= rho <= hi; ``lo`` defaults to 1 / hi (verl's geometric thresholds are 1.0002 - 1.001).
    A row with no sampled token has rho = 1 and is kept. Apply with ``mask * keep[:, None]``.
    """
    lo = 1.0 / hi if lo is None else lo
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"need 0 < lo <= 1 <= hi; got lo={lo}, hi={hi}")
    m, d = _log_ratio(trainer_logprobs, sampler_logprobs, mask, seq_index)
    seq = row_sum(d, m, seq_index, num_seqs) / row_sum(m.long(), m, seq_index, num_seqs).clamp(min=1)
    keep = (seq >= math.log(lo)) & (seq <= math.log(hi))
    return keep, seq.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()


def mismatch_metrics(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    seq_keep: torch.Tensor | None = None,
    cap: float | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> dict[str, torch.Tensor]:
    """Detached 0-d metrics of the gap between trainer and sampler log-probs on sampled tokens.

    mean_abs_diff, max_abs_diff: of |d| over tokens.
    log_ppl_trainer, log_ppl_sampler: mean over sequences (with a sampled token) of -mean_t logp (log-perplexity).
    log_ppl_gap: log_ppl_trainer - log_ppl_sampler (> 0: the trainer finds the tokens less likely).
    kl_k3: token mean of exp(d) - 1 - d, the k3 estimate of KL(sampler || trainer).
    tis_capped_frac (with ``cap``): fraction of tokens whose weight exp(d) exceeds the cap.
    seq_masked_frac (with ``seq_keep`` [B]): fraction of sequences (with a sampled token) masked out.
    """
    m, d = _log_ratio(trainer_logprobs, sampler_logprobs, mask, seq_index)
    layout = {"seq_index": seq_index, "num_seqs": num_seqs}
    t, s = trainer_logprobs.detach().float(), sampler_logprobs.detach().float()
    n_tok = row_sum(m.long(), m, **layout)
    seqs = n_tok > 0
    log_ppl_t = masked_mean(-row_sum(t, m, **layout) / n_tok.clamp(min=1), seqs)
    log_ppl_s = masked_mean(-row_sum(s, m, **layout) / n_tok.clamp(min=1), seqs)
    dc = d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    metrics = {
        "mean_abs_diff": masked_mean(d.abs(), m),
        "max_abs_diff": masked_max(d.abs(), m),
        "log_ppl_trainer": log_ppl_t,
        "log_ppl_sampler": log_ppl_s,
        "log_ppl_gap": log_ppl_t - log_ppl_s,
        "kl_k3": masked_mean(torch.expm1(dc) - dc, m),
    }
    if cap is not None:
        if cap <= 0:
            raise ValueError(f"cap must be > 0; got {cap}")
        metrics["tis_capped_frac"] = masked_mean((d > math.log(cap)).float(), m)
    if seq_keep is not None:
        check_seq_tensor("seq_keep", seq_keep, num_rows(m, seq_index, num_seqs))
        metrics["seq_masked_frac"] = masked_mean((~seq_keep.bool()).float(), seqs)
    return metrics
