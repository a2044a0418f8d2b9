"""Routed MoE (only the chosen experts run) equals a dense every-expert computation masked by the router."""

import pytest
import torch

from ossrl.kernels.moe import expert_path, grouped_matmul, moe_experts, swiglu_clamped
from ossrl.model.mxfp4 import MXFP4Weight


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


class Packed:
    """A stand-in ``PackedWeight``: dequantizes (here: indexes) only the experts asked for."""

    def __init__(self, w):
        self.w = w

    def dequantize(self, dtype, experts=None):
        return (self.w if experts is None else self.w[experts]).to(dtype)


@pytest.mark.parametrize("n", [1, 6])  # 2 pairs < 3 experts: gathered; 12 pairs: the grouped/loop path
def test_weight_can_be_packed_such_as_mxfp4(n):
    torch.manual_seed(0)
    x, ids = torch.randn(n, 8), torch.randint(0, 3, (n, 2))
    weights = torch.full((n, 2), 0.5)
    w1, b1, w2, b2 = torch.randn(3, 8, 10), torch.zeros(3, 10), torch.randn(3, 5, 8), torch.zeros(3, 8)
    torch.testing.assert_close(moe_experts(x, ids, weights, Packed(w1), b1, Packed(w2), b2),
                               moe_experts(x, ids, weights, w1, b1, w2, b2))  # fmt: skip


def test_expert_path_gathers_decode_sized_batches_and_never_reads_the_host_for_them(monkeypatch):
    cpu = torch.device("cpu")  # no grouped GEMM here: dense weights loop once there are enough pairs
    assert expert_path(4, 32, cpu, torch.float32, packed=False) == "gathered"
    assert expert_path(32, 32, cpu, torch.float32, packed=False) == "loop"
    assert expert_path(31, 32, cpu, torch.float32, packed=True) == "gathered"
    monkeypatch.setattr("ossrl.kernels.moe._grouped_mm_works", lambda device, dtype: True)  # as on CUDA in bf16
    assert expert_path(4, 32, cpu, torch.bfloat16, packed=True, mxfp4_kernel=True) == "mxfp4"
    assert expert_path(64 * 32, 32, cpu, torch.bfloat16, packed=True, mxfp4_kernel=True) == "mxfp4"
    assert expert_path(64 * 32 + 1, 32, cpu, torch.bfloat16, packed=True, mxfp4_kernel=True) == "grouped"  # prefill


@pytest.mark.parametrize("n,e,k", [(1, 32, 4), (3, 8, 2), (7, 32, 4)])
def test_gathered_path_matches_the_grouped_path_with_lora_and_gradients(n, e, k, monkeypatch):
    torch.manual_seed(e + n)
    h, i, r = 16, 12, 4
    dd = dict(dtype=torch.float64)
    x = torch.randn(n, h, **dd, requires_grad=True)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    ids[0, -1] = ids[-1, 0] if n > 1 else ids[0, -1]  # an expert shared by two tokens
    weights = torch.softmax(torch.randn(n, k, **dd), -1)
    params = [torch.randn(e, h, 2 * i, **dd), torch.randn(e, 2 * i, **dd), torch.randn(e, i, h, **dd),
              torch.randn(e, h, **dd)]  # fmt: skip
    loras = [torch.randn(e, h, r, **dd), torch.randn(e, r, 2 * i, **dd), torch.randn(e, i, r, **dd),
             torch.randn(e, r, h, **dd)]  # fmt: skip
    leaves = [x, *params, *loras]
    for t in leaves:
        t.requires_grad_(True)

    def run():
        lora_up, lora_down = (loras[0], loras[1], 0.5), (loras[2], loras[3], 2.0)
        out = moe_experts(x, ids, weights, *params, gate_up_lora=lora_up, down_lora=lora_down)
        return out, torch.autograd.grad(out.square().sum(), leaves)

    assert expert_path(n * k, e, x.device, x.dtype, packed=False) == "gathered"
    gathered, gathered_grads = run()
    monkeypatch.setattr("ossrl.kernels.moe.expert_path", lambda *args, **kwargs: "loop")
    looped, looped_grads = run()
    torch.testing.assert_close(gathered, looped)
    for g, ref in zip(gathered_grads, looped_grads, strict=True):
        torch.testing.assert_close(g, ref)


def test_mxfp4_dequantizes_only_the_chosen_experts():
    torch.manual_seed(0)
    weight = MXFP4Weight.from_dense(torch.randn(6, 64, 32))
    ids = torch.tensor([4, 1, 4])
    torch.testing.assert_close(weight.dequantize(torch.float32, ids), weight.dequantize(torch.float32)[ids])


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
