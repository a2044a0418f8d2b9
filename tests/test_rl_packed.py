"""Every ``ossrl.rl`` function gives the same result (values and gradients) on the packed layout ([M] tokens with
seq_index) as on the padded one ([B, T]): the trainer's loss path never pads."""

import pytest
import torch

from ossrl import rl
from ossrl.rl.masked import AGG_MODES

LENGTHS = [3, 1, 5, 0, 4]  # ragged, with an empty row


def layouts(seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), max(LENGTHS)
    valid = torch.arange(t)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask = valid & (torch.rand(b, t, generator=gen) > 0.2)

    def token_tensor(scale):
        padded = torch.full((b, t), float("nan"))  # padding must never be read
        padded[valid] = -torch.rand(int(valid.sum()), generator=gen) * scale
        return padded

    lp, old, sampler = token_tensor(3.0), token_tensor(3.0), token_tensor(3.0)
    seq_index = torch.arange(b)[:, None].expand(b, t)[valid]
    return {
        "padded": (lp, old, sampler, mask, {}),
        "packed": (lp[valid], old[valid], sampler[valid], mask[valid], {"seq_index": seq_index, "num_seqs": b}),
    }, valid


@pytest.mark.parametrize("loss", sorted(rl.POLICY_LOSSES))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_losses_kl_entropy_packed_equal_padded(loss, agg):
    results = {}
    adv = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.5])
    data, valid = layouts()
    for name, (lp, old, sampler, mask, layout) in data.items():
        lp = lp.clone().requires_grad_(True)
        w = rl.truncated_is_weights(lp.detach() * 0.9, sampler, mask, cap=2.0, **({"seq_index": layout["seq_index"]}
                                                                               if layout else {}))  # fmt: skip
        value, metrics = rl.get_policy_loss(loss)(lp, old, adv, mask, agg=agg, max_len=6, is_weights=w, **layout)
        kls = [rl.kl_loss(lp, old, mask, kind=k, agg=agg, max_len=6, **layout) for k in rl.KL_KINDS]
        ent = rl.entropy_bonus(-lp, mask, 0.1, agg=agg, max_len=6, **layout)
        total = value + sum(kls) + ent
        (grad,) = torch.autograd.grad(total, lp)
        grad = grad[valid] if grad.dim() == 2 else grad
        results[name] = (value.detach(), [k.detach() for k in kls], ent.detach(), grad, metrics)
    a, b = results["padded"], results["packed"]
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[2], b[2])
    torch.testing.assert_close(a[3], b[3])
    assert a[4].keys() == b[4].keys()
    for key in a[4]:
        torch.testing.assert_close(a[4][key], b[4][key], msg=key)


def test_mismatch_and_sequence_mask_packed_equal_padded():
    data, _ = layouts(seed=3)
    out = {}
    for name, (lp, _, sampler, mask, layout) in data.items():
        keep, rho = rl.sequence_is_mask(lp, sampler, mask, hi=1.5, **layout)
        metrics = rl.mismatch_metrics(lp, sampler, mask, seq_keep=keep, cap=2.0, **layout)
        out[name] = (keep, rho, metrics)
    assert torch.equal(out["padded"][0], out["packed"][0])
    torch.testing.assert_close(out["padded"][1], out["packed"][1])
    for key, value in out["padded"][2].items():
        torch.testing.assert_close(value, out["packed"][2][key], msg=key)


def test_packed_layout_errors_name_the_problem():
    lp = torch.zeros(4)
    with pytest.raises(ValueError, match="seq_index"):
        rl.ppo_clip_loss(lp, lp, torch.zeros(2), torch.ones(4))
    with pytest.raises(ValueError, match="max_len"):
        rl.aggregate(lp, torch.ones(4), "seq-mean-token-sum-norm", seq_index=torch.zeros(4, dtype=torch.long),
                     num_seqs=1)  # fmt: skip
