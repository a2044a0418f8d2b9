"""Routed MoE (only the chosen experts run) equals a dense every-expert computation masked by the router."""

import pytest
import torch

from ossrl.kernels.moe import grouped_matmul, moe_experts, swiglu_clamped


def dense_moe(x, ids, weights, w1, b1, w2, b2, alpha=1.702, limit=7.0):
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):  # every expert on every token, then keep the routed share
        y = swiglu_clamped(x @ w1[e] + b1[e], alpha, limit) @ w2[e] + b2[e]
        share = (weights * (ids == e)).sum(-1, keepdim=True)
        out = out + share * y
    return out


@pytest.mark.parametrize("n,e,k", [(1, 4, 1), (17, 8, 2), (64, 6, 4), (5, 32, 4)])
def test_routed_moe_matches_dense(n, e, k):
    torch.manual_seed(n)
    h, i = 16, 12
    x = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, k, dtype=torch.float64), -1)
    w1, b1 = torch.randn(e, h, 2 * i, dtype=torch.float64), torch.randn(e, 2 * i, dtype=torch.float64)
    w2, b2 = torch.randn(e, i, h, dtype=torch.float64), torch.randn(e, h, dtype=torch.float64)
    for w in (w1, b1, w2, b2):
        w.requires_grad_(True)
    ours = moe_experts(x, ids, weights, w1, b1, w2, b2)
    ref = dense_moe(x, ids, weights, w1, b1, w2, b2)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours.square().sum(), (x, w1, b1, w2, b2))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, w1, b1, w2, b2))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_weight_can_be_a_callable_such_as_mxfp4_dequantize():
    torch.manual_seed(0)
    x, ids = torch.randn(6, 8), torch.randint(0, 3, (6, 2))
    weights = torch.full((6, 2), 0.5)
    w1, b1, w2, b2 = torch.randn(3, 8, 10), torch.zeros(3, 10), torch.randn(3, 5, 8), torch.zeros(3, 8)
    torch.testing.assert_close(moe_experts(x, ids, weights, lambda: w1, b1, lambda: w2, b2),
                               moe_experts(x, ids, weights, w1, b1, w2, b2))  # fmt: skip


def test_swiglu_clamps_gate_above_only_and_linear_both_sides():
    gate_up = torch.tensor([[20.0, -20.0], [-20.0, 20.0], [1.0, 0.5]])  # columns: gate, linear (interleaved)
    out = swiglu_clamped(gate_up, 1.702, 7.0)
    expected = [7 * torch.sigmoid(torch.tensor(1.702 * 7)) * (-7 + 1),
                -20 * torch.sigmoid(torch.tensor(-1.702 * 20)) * (7 + 1),
                1 * torch.sigmoid(torch.tensor(1.702)) * 1.5]  # fmt: skip
    torch.testing.assert_close(out.squeeze(1), torch.stack(expected))


def test_grouped_matmul_skips_empty_groups():
    x, w = torch.randn(5, 4), torch.randn(3, 4, 2)
    counts = torch.tensor([2, 0, 3])
    out = grouped_matmul(x, w, counts, counts.tolist())
    torch.testing.assert_close(out, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))
