"""Policy losses, aggregation, KL and entropy against hand-computed numbers and gradients."""

import math

import pytest
import torch

from ossrl.rl import (
    aggregate,
    cispo_loss,
    entropy_bonus,
    get_policy_loss,
    gspo_loss,
    kl_estimate,
    kl_loss,
    masked_mean,
    on_policy_old_logprobs,
    pg_loss,
    ppo_clip_loss,
)

NAN = float("nan")


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------- aggregation


LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
AGG_MASK = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])  # middle row empty


def test_aggregate_modes():
    # token-mean: (1 + 2 + 7 + 8 + 9) / 5 = 27 / 5
    close(aggregate(LOSS_MAT, AGG_MASK, "token-mean"), 5.4, atol=0)
    # seq-mean-token-mean: rows 1.5 and 8, empty row left out -> 4.75
    close(aggregate(LOSS_MAT, AGG_MASK, "seq-mean-token-mean"), 4.75, atol=0)
    # seq-mean-token-sum-norm: 27 / (B=3 * L), L = T = 3 by default, or the given constant 6
    close(aggregate(LOSS_MAT, AGG_MASK, "seq-mean-token-sum-norm"), 3.0, atol=0)
    close(aggregate(LOSS_MAT, AGG_MASK, "seq-mean-token-sum-norm", max_len=6), 1.5, atol=0)


def test_aggregate_normalizer_for_micro_batches():
    # two micro-batches of one global batch: the parts, each divided by the global count, sum to the whole
    whole = aggregate(LOSS_MAT, AGG_MASK, "token-mean")
    parts = [aggregate(LOSS_MAT[i : i + 1], AGG_MASK[i : i + 1], "token-mean", normalizer=5) for i in range(3)]
    close(sum(parts), whole.item(), atol=1e-6)
    # seq-mean-token-mean with 2 non-empty sequences in the global batch: (1.5 + 8) / 2
    parts = [aggregate(LOSS_MAT[i : i + 1], AGG_MASK[i : i + 1], "seq-mean-token-mean", normalizer=2) for i in range(3)]
    close(sum(parts), 4.75, atol=1e-6)


def test_aggregate_ignores_nan_off_mask_and_empty_mask():
    mat = torch.tensor([[1.0, NAN], [NAN, NAN]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, False]])
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        out = aggregate(mat, mask, mode)
        assert torch.isfinite(out)
        (g,) = torch.autograd.grad(out, mat)
        assert torch.isfinite(g).all() and g[0, 1] == 0 and (g[1] == 0).all()
    empty = aggregate(mat, torch.zeros(2, 2, dtype=torch.bool), "seq-mean-token-mean")
    assert empty.item() == 0.0
    (g,) = torch.autograd.grad(empty, mat)
    assert (g == 0).all()


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(LOSS_MAT, AGG_MASK, "sum")
    with pytest.raises(ValueError, match="shape"):
        aggregate(LOSS_MAT, AGG_MASK[:, :2])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(LOSS_MAT, AGG_MASK[0])
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(LOSS_MAT, AGG_MASK, normalizer=0)
    with pytest.raises(ValueError, match="max_len"):
        aggregate(LOSS_MAT, AGG_MASK, "seq-mean-token-sum-norm", max_len=0)


def test_masked_mean_per_row():
    close(masked_mean(LOSS_MAT, AGG_MASK, -1), [1.5, 0.0, 8.0], atol=0)


# ---------------------------------------------------------------- PPO clip
# Row 0: A = +1, ratios [1.5, 1.1, pad]; row 1: A = -2, ratios [0.5, 1.0, 2.0]. eps_low 0.2, eps_high 0.28.
#   (0,0) r=1.5 > 1.28, A>0: clipped, loss -1.28, no grad     (0,1) r=1.1: loss -1.1, dL/dlogp = -A r = -1.1
#   (1,0) r=0.5 < 0.8, A<0: clipped, max(1.0, 1.6) = 1.6      (1,1) r=1: loss 2, dL/dlogp = 2
#   (1,2) r=2, A<0: max(4.0, 2.56) = 4 (unclipped), dL/dlogp = 4
# token-mean: (-1.28 - 1.1 + 1.6 + 2 + 4) / 5 = 5.22 / 5 = 1.044; grads divided by 5.

OLD = torch.tensor([[-1.0, -2.0, NAN], [-1.5, -0.7, -3.0]])
RATIOS = torch.tensor([[1.5, 1.1, 1.0], [0.5, 1.0, 2.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -2.0])


def ppo_inputs() -> torch.Tensor:
    new = OLD + RATIOS.log()
    new[0, 2] = NAN  # padding: garbage must not leak into the loss or the gradient
    return new.requires_grad_(True)


def test_ppo_clip_values_grads_metrics():
    new = ppo_inputs()
    loss, metrics = ppo_clip_loss(new, OLD, ADV, MASK, eps_low=0.2, eps_high=0.28)
    close(loss, 1.044)
    (grad,) = torch.autograd.grad(loss, new)
    close(grad, [[0.0, -0.22, 0.0], [0.0, 0.4, 0.8]])
    assert grad[0, 0] == 0 and grad[1, 0] == 0  # clipped tokens: exactly zero gradient
    close(metrics["clip_frac_low"], 0.2)  # (1,0)
    close(metrics["clip_frac_high"], 0.2)  # (0,0)
    close(metrics["dual_clip_frac"], 0.0)
    close(metrics["ratio_mean"], 1.22)  # (1.5 + 1.1 + 0.5 + 1 + 2) / 5
    close(metrics["ratio_max"], 2.0)
    # k3: r - 1 - log r = .094535, .004690, .193147, 0, .306853 -> mean .119845
    close(metrics["approx_kl"], 0.119845)
    assert not any(v.requires_grad for v in metrics.values())


def test_ppo_dual_clip():
    # c = 1.8: (1,2) has A<0 and r=2 > 1.8 -> loss capped at -A c = 3.6, no grad. (5.22 - 4 + 3.6) / 5 = 0.964
    new = ppo_inputs()
    loss, metrics = ppo_clip_loss(new, OLD, ADV, MASK, eps_low=0.2, eps_high=0.28, dual_clip=1.8)
    close(loss, 0.964)
    (grad,) = torch.autograd.grad(loss, new)
    close(grad, [[0.0, -0.22, 0.0], [0.0, 0.4, 0.0]])
    close(metrics["dual_clip_frac"], 0.2)


def test_ppo_aggregation_modes():
    new = ppo_inputs()
    # rows: (-1.28 - 1.1) / 2 = -1.19 and (1.6 + 2 + 4) / 3 = 2.533333 -> mean 0.671667
    loss, _ = ppo_clip_loss(new, OLD, ADV, MASK, agg="seq-mean-token-mean")
    close(loss, 0.671667)
    # Dr.GRPO: 5.22 / (B=2 * L=4)
    loss, _ = ppo_clip_loss(new, OLD, ADV, MASK, agg="seq-mean-token-sum-norm", max_len=4)
    close(loss, 0.6525)


def test_ppo_is_weights():
    # per-token losses [-1.28, -1.1 | 1.6, 2, 4] times weights [2, .5 | 1, 1, .25] -> sum 1.49, / 5 = .298
    new = ppo_inputs()
    w = torch.tensor([[2.0, 0.5, 9.0], [1.0, 1.0, 0.25]])
    loss, _ = ppo_clip_loss(new, OLD, ADV, MASK, is_weights=w)
    close(loss, 0.298)
    (grad,) = torch.autograd.grad(loss, new)
    close(grad, [[0.0, -0.11, 0.0], [0.0, 0.4, 0.2]])


def test_ppo_empty_rows_and_empty_batch():
    new = ppo_inputs()
    mask = MASK.clone()
    mask[1] = 0  # only row 0 left: (-1.28 - 1.1) / 2
    loss, metrics = ppo_clip_loss(new, OLD, ADV, mask)
    close(loss, -1.19)
    close(metrics["clip_frac_low"], 0.0)
    loss, metrics = ppo_clip_loss(new, OLD, ADV, torch.zeros_like(MASK))
    assert loss.item() == 0.0 and metrics["ratio_max"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, new)
    assert (grad == 0).all()


def test_ppo_bf16_inputs_run_in_fp32():
    new = ppo_inputs().detach().bfloat16().requires_grad_(True)
    loss, _ = ppo_clip_loss(new, OLD.bfloat16(), ADV, MASK)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, new)
    assert grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- GSPO
# Row 0: A = +1, token log-ratios [0.2, 0.0] -> s = exp(0.1) = 1.105171 (eps 0.2: not clipped)
# Row 1: A = -1, log-ratios [-0.3] * 3 -> s = exp(-0.3) = 0.740818 < 0.8, A<0: clipped, loss 0.8 per token, no grad
# seq-mean-token-mean: (-1.105171 + 0.8) / 2 = -0.152585
# grad row 0, each token: (1/B) (1/|y|) (-A s) = -1.105171 / 4 = -0.276293 (same for both tokens)

GSPO_OLD = torch.tensor([[-1.0, -1.0, NAN], [-2.0, -2.0, -2.0]])
GSPO_LOG_RATIO = torch.tensor([[0.2, 0.0, 0.0], [-0.3, -0.3, -0.3]])
GSPO_ADV = torch.tensor([1.0, -1.0])


def gspo_inputs() -> torch.Tensor:
    new = GSPO_OLD + GSPO_LOG_RATIO
    new[0, 2] = NAN
    return new.requires_grad_(True)


def test_gspo_sequence_ratio_and_grads():
    new = gspo_inputs()
    loss, metrics = gspo_loss(new, GSPO_OLD, GSPO_ADV, MASK, eps_low=0.2, eps_high=0.2)
    close(loss, -0.152585)
    (grad,) = torch.autograd.grad(loss, new)
    close(grad, [[-0.276293, -0.276293, 0.0], [0.0, 0.0, 0.0]])
    close(metrics["clip_frac_low"], 0.5)  # 1 of 2 sequences
    close(metrics["clip_frac_high"], 0.0)
    close(metrics["ratio_mean"], 0.922995)  # (1.105171 + 0.740818) / 2
    close(metrics["ratio_max"], 1.105171)
    # token-level PPO on the same data clips token (0,0) (r = exp(.2) = 1.2214 > 1.2): GSPO does not
    loss_ppo, _ = ppo_clip_loss(new, GSPO_OLD, GSPO_ADV, MASK, eps_low=0.2, eps_high=0.2)
    (grad_ppo,) = torch.autograd.grad(loss_ppo, new)
    assert grad_ppo[0, 0] == 0 and grad[0, 0] != 0


def test_gspo_paper_defaults_clip_whole_sequences():
    # eps 3e-4 / 4e-4: s = 1.105 (A>0) and 0.741 (A<0) are both clipped -> no gradient anywhere
    new = gspo_inputs()
    loss, metrics = gspo_loss(new, GSPO_OLD, GSPO_ADV, MASK)
    (grad,) = torch.autograd.grad(loss, new)
    assert (grad == 0).all()
    close(metrics["clip_frac_low"], 0.5)
    close(metrics["clip_frac_high"], 0.5)
    # loss values: row 0: -1.0004 per token, row 1: -A (1 - 3e-4) = 0.9997 -> (-1.0004 + 0.9997) / 2
    close(loss, -0.00035)


def test_gspo_empty_row_is_left_out():
    new = torch.cat([gspo_inputs().detach(), torch.full((1, 3), NAN)]).requires_grad_(True)
    old = torch.cat([GSPO_OLD, torch.full((1, 3), NAN)])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=MASK.dtype)])
    loss, metrics = gspo_loss(new, old, torch.tensor([1.0, -1.0, 5.0]), mask, eps_low=0.2, eps_high=0.2)
    close(loss, -0.152585)
    close(metrics["clip_frac_low"], 0.5)
    (grad,) = torch.autograd.grad(loss, new)
    assert torch.isfinite(grad).all()


# ---------------------------------------------------------------- CISPO
# A = 2, logp = [-1, -2, -.5, -.25], ratios [.5, 1, 3, 6], eps_high = 1 (cap 2), no lower bound:
#   weights [.5, 1, 2, 2]; loss_t = -w A logp = [1, 4, 2, 1] -> token-mean 2; grad = -w A / 4 = [-.25, -.5, -1, -1]
CISPO_LP = torch.tensor([[-1.0, -2.0, -0.5, -0.25]])
CISPO_RATIOS = torch.tensor([[0.5, 1.0, 3.0, 6.0]])


def test_cispo_values_and_grads():
    new = CISPO_LP.clone().requires_grad_(True)
    old = CISPO_LP - CISPO_RATIOS.log()
    mask = torch.ones(1, 4)
    loss, metrics = cispo_loss(new, old, torch.tensor([2.0]), mask, eps_high=1.0)
    close(loss, 2.0)
    (grad,) = torch.autograd.grad(loss, new)
    close(grad, [[-0.25, -0.5, -1.0, -1.0]])  # every token keeps a gradient, even the truncated ones
    close(metrics["clip_frac_high"], 0.5)
    close(metrics["clip_frac_low"], 0.0)
    close(metrics["ratio_mean"], 2.625)  # (.5 + 1 + 3 + 6) / 4
    # with a lower bound 1 - 0.2: first weight .5 -> .8: loss (1.6 + 4 + 2 + 1) / 4 = 2.15, grad[0] = -.8 * 2 / 4
    loss, metrics = cispo_loss(new, old, torch.tensor([2.0]), mask, eps_low=0.2, eps_high=1.0)
    close(loss, 2.15)
    (grad,) = torch.autograd.grad(loss, new)
    close(grad, [[-0.4, -0.5, -1.0, -1.0]])
    close(metrics["clip_frac_low"], 0.25)


# ---------------------------------------------------------------- vanilla PG and strict on-policy


def test_pg_loss():
    # loss_t = -A logp: [1, 2 | -0.5] -> 2.5 / 3; grad = -A / 3
    lp = torch.tensor([[-1.0, -2.0], [-0.5, NAN]], requires_grad=True)
    loss, _ = pg_loss(lp, None, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]]))
    close(loss, 0.833333)
    (grad,) = torch.autograd.grad(loss, lp)
    close(grad, [[-1 / 3, -1 / 3], [1 / 3, 0.0]])


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo"])
def test_strict_on_policy_ratio_one_and_vanilla_gradient(name):
    torch.manual_seed(0)
    lp = (-torch.rand(2, 2) * 3).requires_grad_(True)
    old = on_policy_old_logprobs(lp)
    assert not old.requires_grad
    assert torch.equal(torch.exp(lp - old), torch.ones(2, 2))  # ratio exactly 1
    adv, mask = torch.tensor([1.0, -0.5]), torch.ones(2, 2)
    loss, metrics = get_policy_loss(name)(lp, old, adv, mask)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["ratio_max"].item() == 1.0
    assert metrics["clip_frac_low"].item() == 0.0 and metrics["clip_frac_high"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, lp)
    # vanilla policy gradient of token-mean -A logp over 4 tokens: -A / 4 (GSPO's seq-mean-token-mean: -A/(2*2))
    assert torch.equal(grad, torch.tensor([[-0.25, -0.25], [0.125, 0.125]]))
    agg = "seq-mean-token-mean" if name == "gspo" else "token-mean"
    (grad_pg,) = torch.autograd.grad(pg_loss(lp, None, adv, mask, agg=agg)[0], lp)
    assert torch.equal(grad, grad_pg)


# ---------------------------------------------------------------- shared errors


def test_policy_loss_errors():
    new = ppo_inputs()
    with pytest.raises(ValueError, match="unknown policy loss"):
        get_policy_loss("grpo++")
    with pytest.raises(ValueError, match="old_logprobs"):
        ppo_clip_loss(new, OLD[:, :2], ADV, MASK)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(new, OLD, ADV[:, None].expand(2, 3), MASK)
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(new, OLD, ADV[:1], MASK)
    with pytest.raises(ValueError, match="is_weights"):
        cispo_loss(new, OLD, ADV, MASK, is_weights=torch.ones(3, 3))
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        ppo_clip_loss(new, OLD, ADV, MASK, agg="token-sum")
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip_loss(new, OLD, ADV, MASK, eps_low=1.5)
    with pytest.raises(ValueError, match="eps_high"):
        cispo_loss(new, OLD, ADV, MASK, eps_high=-1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(new, OLD, ADV, MASK, dual_clip=1.0)


# ---------------------------------------------------------------- KL and entropy
# logp = [log .5, log .25, log .5], ref = [log .25, log .5, log .5]; d = ref - logp = [-log 2, log 2, 0]
#   k1 = -d = [.693147, -.693147, 0]; k2 = d^2/2 = [.240227, .240227, 0]
#   k3 = e^d - 1 - d = [.5 - 1 + .693147, 2 - 1 - .693147, 0] = [.193147, .306853, 0]
KL_LP = torch.tensor([[0.5, 0.25, 0.5]]).log()
KL_REF = torch.tensor([[0.25, 0.5, 0.5]]).log()


def test_kl_estimators():
    close(kl_estimate(KL_LP, KL_REF, "k1"), [[0.693147, -0.693147, 0.0]])
    close(kl_estimate(KL_LP, KL_REF, "k2"), [[0.240227, 0.240227, 0.0]])
    close(kl_estimate(KL_LP, KL_REF, "k3"), [[0.193147, 0.306853, 0.0]])
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(KL_LP, KL_REF, "k4")
    with pytest.raises(ValueError, match="differ"):
        kl_estimate(KL_LP, KL_REF[:, :2])


def test_kl_loss_masked_and_grad():
    lp = torch.cat([KL_LP, torch.tensor([[NAN, NAN, NAN]])]).requires_grad_(True)
    ref = torch.cat([KL_REF, torch.tensor([[NAN, NAN, NAN]])])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    loss = kl_loss(lp, ref, mask)  # (.193147 + .306853 + 0) / 3 = 0.5 / 3
    close(loss, 0.166667)
    # d k3 / d logp = 1 - e^d = [.5, -1, 0], / 3 tokens
    (grad,) = torch.autograd.grad(loss, lp)
    close(grad, [[0.166667, -0.333333, 0.0], [0.0, 0.0, 0.0]])
    close(kl_loss(lp, ref, mask, kind="k2"), 0.160151)  # 2 * .240227 / 3
    close(kl_loss(lp, ref, mask, kind="k1"), 0.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_loss(lp, ref[:1], mask)


def test_entropy_bonus():
    # token-mean of entropies (1 + 3 + 4) / 3 = 8/3, times -0.01
    ent = torch.tensor([[1.0, NAN], [3.0, 4.0]])
    close(entropy_bonus(ent, torch.tensor([[1, 0], [1, 1]]), 0.01), -0.01 * 8 / 3)
    # seq-mean-token-mean: (1 + 3.5) / 2 = 2.25
    close(entropy_bonus(ent, torch.tensor([[1, 0], [1, 1]]), 1.0, agg="seq-mean-token-mean"), -2.25)
    assert math.isfinite(entropy_bonus(ent, torch.zeros(2, 2), 0.01).item())
