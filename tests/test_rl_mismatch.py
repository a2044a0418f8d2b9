"""Training-inference mismatch: truncated IS, sequence masking, metrics, against hand-computed numbers."""

import pytest
import torch

from ossrl.rl import mismatch_metrics, ppo_clip_loss, sequence_is_mask, truncated_is_weights

NAN = float("nan")

# d = trainer - sampler: row 0 [0.1, -0.1, 0.3], row 1 [1.0, -0.2, pad]
SAMPLER = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, NAN]])
TRAINER = torch.tensor([[-0.9, -2.1, -0.2], [-2.0, -1.2, NAN]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_truncated_is_weights():
    # exp(d) = [1.105171, 0.904837, 1.349859 | 2.718282 -> capped at 2, 0.818731 | masked -> 0]
    trainer = TRAINER.clone().requires_grad_(True)
    w = truncated_is_weights(trainer, SAMPLER, MASK, cap=2.0)
    close(w, [[1.105171, 0.904837, 1.349859], [2.0, 0.818731, 0.0]])
    assert not w.requires_grad
    # cap 1: every weight above 1 is cut to 1
    close(truncated_is_weights(TRAINER, SAMPLER, MASK, cap=1.0), [[1.0, 0.904837, 1.0], [1.0, 0.818731, 0.0]])
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(TRAINER, SAMPLER, MASK, cap=0.0)


def test_truncated_is_weights_identical_logprobs_are_one():
    assert torch.equal(truncated_is_weights(SAMPLER, SAMPLER, MASK), torch.tensor([[1.0, 1, 1], [1, 1, 0]]))


def test_sequence_is_mask():
    # row 0: mean d = 0.3 / 3 = 0.1 -> rho = 1.105171; row 1: 0.8 / 2 = 0.4 -> rho = 1.491825
    keep, rho = sequence_is_mask(TRAINER, SAMPLER, MASK, lo=0.9, hi=1.2)
    assert keep.tolist() == [True, False]
    close(rho, [1.105171, 1.491825])
    # default lo = 1/hi; hi = 1.5 keeps both, hi = 1.1 keeps neither
    assert sequence_is_mask(TRAINER, SAMPLER, MASK, hi=1.5)[0].tolist() == [True, True]
    assert sequence_is_mask(TRAINER, SAMPLER, MASK, hi=1.1)[0].tolist() == [False, False]
    # lower side: swap roles -> rho = 1/1.105 = 0.904837, 1/1.4918 = 0.670320; lo = 0.8 drops row 1 only
    keep, rho = sequence_is_mask(SAMPLER, TRAINER, MASK, lo=0.8, hi=1.2)
    assert keep.tolist() == [True, False]
    close(rho, [0.904837, 0.670320])


def test_sequence_is_mask_empty_row_and_errors():
    mask = MASK.clone()
    mask[1] = 0
    keep, rho = sequence_is_mask(TRAINER, SAMPLER, mask, lo=0.9, hi=1.2)
    assert keep.tolist() == [True, True] and rho[1].item() == 1.0
    with pytest.raises(ValueError, match="lo"):
        sequence_is_mask(TRAINER, SAMPLER, MASK, lo=1.1, hi=1.2)
    with pytest.raises(ValueError, match="lo"):
        sequence_is_mask(TRAINER, SAMPLER, MASK, hi=0.9)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        sequence_is_mask(TRAINER, SAMPLER[:, :2], MASK)


def test_mismatch_metrics():
    keep = torch.tensor([True, False])
    m = mismatch_metrics(TRAINER, SAMPLER, MASK, seq_keep=keep, cap=2.0)
    close(m["mean_abs_diff"], 0.34)  # (0.1 + 0.1 + 0.3 + 1.0 + 0.2) / 5
    close(m["max_abs_diff"], 1.0)
    # per-sequence -mean logp: trainer 3.2/3 = 1.066667 and 3.2/2 = 1.6 -> 1.333333;
    # sampler 3.5/3 = 1.166667 and 4/2 = 2 -> 1.583333; gap -0.25
    close(m["log_ppl_trainer"], 1.333333)
    close(m["log_ppl_sampler"], 1.583333)
    close(m["log_ppl_gap"], -0.25)
    # e^d - 1 - d: .005171 + .004837 + .049859 + .718282 + .018731 = .796880, / 5
    close(m["kl_k3"], 0.159376)
    close(m["tis_capped_frac"], 0.2)  # only d = 1.0 > log 2
    close(m["seq_masked_frac"], 0.5)
    assert all(torch.isfinite(v) for v in m.values())


def test_mismatch_metrics_identical_and_empty():
    m = mismatch_metrics(SAMPLER, SAMPLER, MASK)
    assert m["mean_abs_diff"].item() == 0 and m["max_abs_diff"].item() == 0 and m["log_ppl_gap"].item() == 0
    assert "tis_capped_frac" not in m and "seq_masked_frac" not in m
    m = mismatch_metrics(TRAINER, SAMPLER, torch.zeros_like(MASK), seq_keep=torch.tensor([True, True]))
    assert all(v.item() == 0 for v in m.values())
    with pytest.raises(ValueError, match="seq_keep"):
        mismatch_metrics(TRAINER, SAMPLER, MASK, seq_keep=torch.tensor([True]))


def test_corrections_plug_into_the_policy_loss():
    # strict on-policy PPO with the trainer's log-probs, TIS weights from the sampler, and the sequence mask:
    # row 1 is masked out (rho 1.49 > 1.2); row 0 (A = 1): loss = -(1.105171 + 0.904837 + 1.349859) / 3
    lp = TRAINER.clone().requires_grad_(True)
    w = truncated_is_weights(lp, SAMPLER, MASK, cap=2.0)
    keep, _ = sequence_is_mask(lp, SAMPLER, MASK, lo=0.9, hi=1.2)
    loss, _ = ppo_clip_loss(lp, lp.detach(), torch.tensor([1.0, 1.0]), MASK * keep[:, None], is_weights=w)
    close(loss, -1.119956)
    (grad,) = torch.autograd.grad(loss, lp)
    close(grad, [[-0.368390, -0.301612, -0.449953], [0.0, 0.0, 0.0]])  # -w / 3
