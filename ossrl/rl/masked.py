"""Masked reductions and loss aggregation over token tensors: padded [B, T], or packed [M] with ``seq_index``.

A mask is 1 (or True) on tokens the policy sampled and 0 elsewhere (prompt, tool output, padding). Values at
masked-out positions are never read: they may be NaN or inf (e.g. padding) without affecting results or gradients.

Aggregation modes (``l`` the per-token loss, ``m`` the mask, ``B`` rows, ``n_i = sum_t m_it``):
    token-mean               sum_it m_it l_it / sum_it m_it                     (DAPO; TRL "dapo"/"bnpo")
    seq-mean-token-mean      mean over rows with n_i > 0 of (sum_t m_it l_it / n_i)   (original GRPO, GSPO)
    seq-mean-token-sum-norm  sum_it m_it l_it / (B * L)  with L a constant max length   (Dr.GRPO)
``normalizer`` replaces the count in the denominator (tokens for token-mean, rows for the seq-mean modes): pass the
global count when one batch is split into micro-batches or across ranks, so the sum of the parts is the whole.

Packed layout: token tensors may instead be 1-D [M] (the tokens of all sequences one after the other, no padding)
with ``seq_index`` [M] (long: the sequence, 0..B-1, each token belongs to) and ``num_seqs`` B. Every function of
``ossrl.rl`` that takes a mask takes these two keywords and gives the same result as on the padded layout.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as a bool tensor (nonzero = sampled token)."""
    return mask if mask.dtype == torch.bool else mask != 0


def check_token_tensors(
    mask: torch.Tensor, seq_index: torch.Tensor | None = None, **tensors: torch.Tensor | None
) -> torch.Tensor:
    """Check ``mask`` is [B, T] (or [M] with ``seq_index`` [M]) and every given tensor has its shape; return the
    mask as bool."""
    if seq_index is None and mask.dim() != 2:
        raise ValueError(f"mask must be [B, T] (or [M] with seq_index); got shape {tuple(mask.shape)}")
    if seq_index is not None and (mask.dim() != 1 or seq_index.shape != mask.shape):
        raise ValueError(f"packed layout: mask and seq_index must both be [M]; got {tuple(mask.shape)} and "
                         f"{tuple(seq_index.shape)}")  # fmt: skip
    for name, t in tensors.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}; got {tuple(t.shape)}")
    return as_bool_mask(mask)


def check_seq_tensor(name: str, t: torch.Tensor, batch: int) -> None:
    """Check a per-sequence tensor is [B]."""
    if t.shape != (batch,):
        raise ValueError(f"{name} must be per-sequence with shape ({batch},); got {tuple(t.shape)}")


def num_rows(mask: torch.Tensor, seq_index: torch.Tensor | None, num_seqs: int | None) -> int:
    """B: rows of a padded mask, or ``num_seqs`` of a packed one."""
    if seq_index is None:
        return mask.shape[0]
    if num_seqs is None:
        raise ValueError("packed layout: pass num_seqs with seq_index")
    return num_seqs


def row_sum(
    x: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor | None = None, num_seqs: int | None = None
) -> torch.Tensor:
    """[B]: per sequence, the sum of x over its masked-in tokens."""
    if seq_index is None:
        return masked_sum(x, mask, -1)
    m = as_bool_mask(mask)
    values = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    out = torch.zeros(num_rows(m, seq_index, num_seqs), dtype=x.dtype, device=x.device)
    return out.index_add(0, seq_index, values)


def per_token(values: torch.Tensor, seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """A per-sequence tensor [B] laid out to broadcast against token tensors: [B, 1], or [M] when packed."""
    return values[:, None] if seq_index is None else values[seq_index]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all dims if None); masked-out values are ignored, even NaN."""
    m = as_bool_mask(mask)
    x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over ``dim``; 0 where the mask is empty."""
    m = as_bool_mask(mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max of x over masked-in positions; 0 when the mask is empty."""
    m = as_bool_mask(mask)
    neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    out = torch.where(m, x, neg_inf).amax() if x.numel() else neg_inf
    return torch.where(m.any(), out, torch.zeros_like(out))


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] (or packed [M]) to a scalar with one of ``AGG_MODES`` (module docstring).

    ``max_len`` is the constant L of seq-mean-token-sum-norm (default T, required when packed; set it to the
    generation limit so the scale does not change with the batch's padding). An empty mask gives 0, with a
    gradient of zeros.
    """
    m = check_token_tensors(mask, seq_index, loss_mat=loss_mat)
    if normalizer is not None and float(normalizer) <= 0:
        raise ValueError(f"normalizer must be > 0; got {float(normalizer)}")
    if mode == "token-mean":
        denom = m.sum().clamp(min=1) if normalizer is None else normalizer
        return masked_sum(loss_mat, m) / denom
    if mode == "seq-mean-token-mean":
        n_tok = row_sum(m.long(), m, seq_index, num_seqs)
        per_seq = row_sum(loss_mat, m, seq_index, num_seqs) / n_tok.clamp(min=1)
        denom = (n_tok > 0).sum().clamp(min=1) if normalizer is None else normalizer
        return per_seq.sum() / denom
    if mode == "seq-mean-token-sum-norm":
        if seq_index is not None and max_len is None:
            raise ValueError("seq-mean-token-sum-norm on the packed layout needs max_len")
        length = loss_mat.shape[-1] if max_len is None else max_len
        if length <= 0:
            raise ValueError(f"max_len must be > 0; got {length}")
        rows = max(num_rows(m, seq_index, num_seqs), 1) if normalizer is None else normalizer
        return masked_sum(loss_mat, m) / (rows * length)
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")
