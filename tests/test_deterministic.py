"""Deterministic mode, op by op (``ossrl.kernels.batch_invariant``): every op's result for a row is bitwise the same
whatever batch the row sits in, on random shapes, fp32 and bf16; attention gives a query the same bits over a packed
batch (training forward, prefill) and over a paged KV cache (decode steps, tool-result appends); the mode switches
the dispatch points and nothing else."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import ossrl
from ossrl.kernels import batch_invariant as bi
from ossrl.kernels import common, deterministic_enabled, linear, rms_norm, sink_attention, sink_attention_ref
from ossrl.kernels.decode_ref import paged_decode_attention
from ossrl.kernels.moe import moe_experts
from ossrl.model.mxfp4 import MXFP4Weight

DTYPES = [torch.float32, torch.bfloat16]


def rows_alone(f, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([f(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_row_depends_on_that_row_only(dtype):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    shapes = [(128, 128), (128, 8), (16, 1260), (7, 9), (13, 301), (33, 65), (2880, 48)]
    for k, n in shapes + [(rng.randint(1, 300), rng.randint(1, 300)) for _ in range(6)]:
        w = torch.randn(n, k, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype)
        x = torch.randn(70, k, generator=gen).to(dtype)
        alone = rows_alone(lambda r: bi.linear(r, w, b), x)  # noqa: B023
        for m in (1, 2, 3, 17, 64, 70):
            index = torch.tensor(rng.sample(range(70), m))  # any rows, any order
            assert torch.equal(bi.linear(x[index], w, b), alone[index]), (k, n, m)
        ref = F.linear(x.float(), w.float(), b.float())
        torch.testing.assert_close(alone.float(), ref, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=1e-2)
        wt = w.t().contiguous().t()  # a transposed view (the experts' [in, out] weights) computes the same
        assert torch.equal(bi.linear(x.view(7, 10, k), wt, b), alone.view(7, 10, n))


def test_linear_backward_is_the_plain_matmul_gradient():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 16, generator=gen, requires_grad=True)
    w = torch.randn(12, 16, generator=gen, requires_grad=True)
    b = torch.randn(12, generator=gen, requires_grad=True)
    out = bi.linear(x, w, b)
    assert torch.equal(out.detach(), bi.linear(x.detach(), w.detach(), b.detach()))  # autograd: same forward bits
    grads = torch.autograd.grad((out * torch.arange(12.0)).sum(), (x, w, b))
    ref = torch.autograd.grad((F.linear(x, w, b) * torch.arange(12.0)).sum(), (x, w, b))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r)


def test_row_reductions_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(2)
    for vocab in (1260, 201088):  # 201088: a single row would be split across threads without row_sum's guard
        x = torch.randn(4, vocab, generator=gen) * 3
        tokens = torch.randint(0, vocab, (4,), generator=gen)
        lp = bi.token_logprobs(x, tokens)
        assert torch.equal(lp, torch.cat([bi.token_logprobs(x[i : i + 1], tokens[i : i + 1]) for i in range(4)]))
        torch.testing.assert_close(lp, torch.log_softmax(x, -1).gather(-1, tokens[:, None]).squeeze(1))
        lp2, ent = bi.token_logprobs_and_entropy(x, tokens)
        assert torch.equal(lp2, lp)
        torch.testing.assert_close(ent, torch.distributions.Categorical(logits=x).entropy(), atol=1e-4, rtol=1e-5)
    for dtype in DTYPES:
        x = torch.randn(33, 128, generator=gen).to(dtype)
        weight = torch.rand(128, generator=gen) + 0.5
        out = bi.rms_norm(x, weight, 1e-5)
        assert torch.equal(out, rows_alone(lambda r: bi.rms_norm(r, weight, 1e-5), x))  # noqa: B023
        xf = x.float()
        ref = (weight * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        torch.testing.assert_close(out, ref)
    gates = torch.randn(9, 4, generator=gen)
    assert torch.equal(bi.softmax(gates), rows_alone(bi.softmax, gates))
    torch.testing.assert_close(bi.softmax(gates), torch.softmax(gates, -1))


def random_sequences(gen, dtype, lens, hq=4, hkv=2, d=32):
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(hq, generator=gen)


def cu(lens):
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lens).cumsum(0)
    return out


def page_cache(k, v, lens, page_size, gen):
    """The sequences' keys/values in a paged cache with shuffled pages (stale garbage in every unused slot)."""
    pages_per = [-(-n // page_size) for n in lens]
    total = sum(pages_per) + 3
    order = torch.randperm(total, generator=gen).tolist()
    kc = torch.randn(total, page_size, *k.shape[1:], generator=gen).to(k.dtype)
    vc = torch.randn(total, page_size, *v.shape[1:], generator=gen).to(v.dtype)
    table = torch.zeros(len(lens), max(pages_per), dtype=torch.int32)
    start = 0
    for b, n in enumerate(lens):
        pages = [order.pop() for _ in range(pages_per[b])]
        table[b, : len(pages)] = torch.tensor(pages)
        for j in range(n):
            kc[pages[j // page_size], j % page_size] = k[start + j]
            vc[pages[j // page_size], j % page_size] = v[start + j]
        start += n
    return kc, vc, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 8, 100])
def test_attention_packed_prefill_and_paged_decode_give_a_query_the_same_bits(dtype, window):
    gen = torch.Generator().manual_seed(3)
    lens = [1, 70, 5, 150, 64, 33]
    q, k, v, sinks = random_sequences(gen, dtype, lens)
    starts = cu(lens).tolist()
    packed = bi.sink_attention(q, k, v, sinks, cu(lens), max(lens), window)
    ref = sink_attention_ref(q, k, v, sinks, cu(lens), max(lens), window)
    torch.testing.assert_close(packed.float(), ref.float(), atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    seqs = [slice(a, b) for a, b in zip(starts, starts[1:], strict=False)]
    # another packing: reversed order, and every sequence alone and cut short (a prefill of a prefix)
    order = list(reversed(range(len(lens))))
    idx = torch.cat([torch.arange(seqs[i].start, seqs[i].stop) for i in order])
    other = bi.sink_attention(q[idx], k[idx], v[idx], sinks, cu([lens[i] for i in order]), max(lens), window)
    assert torch.equal(other, packed[idx])
    for s, n in zip(seqs, lens, strict=True):
        cut = max(1, n - 7)
        alone = bi.sink_attention(q[s][:cut], k[s][:cut], v[s][:cut], sinks, cu([cut]), cut, window)
        assert torch.equal(alone, packed[s][:cut])
    # the paged cache: decode one token per sequence, and appends of several (a tool result) at once
    kc, vc, table = page_cache(k, v, lens, 16, gen)
    for q_lens in ([1] * len(lens), [1, 9, 5, 40, 1, 33]):
        rows = torch.cat([torch.arange(s.stop - m, s.stop) for s, m in zip(seqs, q_lens, strict=True)])
        out = bi.paged_decode_attention(q[rows], kc, vc, table, torch.tensor(lens, dtype=torch.int32), cu(q_lens),
                                        max(q_lens), sinks, window)  # fmt: skip
        assert torch.equal(out, packed[rows])


def test_attention_backward_matches_the_reference():
    gen = torch.Generator().manual_seed(4)
    lens = [40, 3, 90]
    q, k, v, sinks = random_sequences(gen, torch.float32, lens)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    dout = torch.randn(q.shape, generator=gen)
    out = bi.sink_attention(*inputs, cu(lens), max(lens), 8)
    ref = sink_attention_ref(*ref_inputs, cu(lens), max(lens), 8)
    for g, r in zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, ref_inputs, dout), strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mxfp4", [False, True])
def test_moe_row_depends_on_that_token_only(dtype, mxfp4):
    gen = torch.Generator().manual_seed(5)
    e, h, i, top = 8, 64, 32, 2
    gate_up = torch.randn(e, h, 2 * i, generator=gen) * 0.2
    down = torch.randn(e, i, h, generator=gen) * 0.2
    if mxfp4:
        gate_up, down = MXFP4Weight.from_dense(gate_up), MXFP4Weight.from_dense(down)
    else:
        gate_up, down = gate_up.to(dtype), down.to(dtype)
    bias_up, bias_down = torch.randn(e, 2 * i, generator=gen).to(dtype), torch.randn(e, h, generator=gen).to(dtype)
    lora_up = (torch.randn(e, h, 4, generator=gen) * 0.1, torch.randn(e, 4, 2 * i, generator=gen) * 0.1, 2.0)
    lora_down = (torch.randn(e, i, 4, generator=gen) * 0.1, torch.randn(e, 4, h, generator=gen) * 0.1, 2.0)
    x = torch.randn(40, h, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top] for _ in range(40)])
    ids[:20] = ids[0]  # one expert pair with many rows, the others with a few
    weights = torch.softmax(torch.randn(40, top, generator=gen), -1).to(dtype)
    args = (gate_up, bias_up, down, bias_down)

    def run(rows):
        return bi.moe_experts(x[rows], ids[rows], weights[rows], *args, gate_up_lora=lora_up, down_lora=lora_down)

    full = run(torch.arange(40))
    for m in (1, 3, 40):
        rows = torch.randperm(40, generator=gen)[:m]
        assert torch.equal(run(rows), full[rows])
    with ossrl.deterministic(False):
        fast = moe_experts(x, ids, weights, *args, gate_up_lora=lora_up, down_lora=lora_down)
    torch.testing.assert_close(full.float(), fast.float(), atol=1e-4 if dtype == torch.float32 else 0.1, rtol=1e-2)


def test_the_mode_switches_every_dispatch_point_and_restores(monkeypatch):
    assert not deterministic_enabled() and not ossrl.is_deterministic()
    calls = []
    for name in ("linear", "rms_norm", "sink_attention", "paged_decode_attention", "moe_experts"):
        original = getattr(bi, name)
        monkeypatch.setattr(bi, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    gen = torch.Generator().manual_seed(6)
    q, k, v, sinks = random_sequences(gen, torch.float32, [5])
    kc, vc, table = page_cache(k, v, [5], 4, gen)
    x, w = torch.randn(3, 8, generator=gen), torch.randn(4, 8, generator=gen)

    def everything():
        linear(x, w)
        rms_norm(x, torch.ones(8), 1e-5)
        sink_attention(q, k, v, sinks, cu([5]), 5)
        paged_decode_attention(q[-1:], kc, vc, table, torch.tensor([5], dtype=torch.int32), cu([1]), 1, sinks)
        moe_experts(x, torch.tensor([[0, 1]] * 3), torch.ones(3, 2) / 2, torch.randn(2, 8, 8), torch.zeros(2, 8),
                    torch.randn(2, 4, 8), torch.zeros(2, 8))  # fmt: skip

    everything()
    assert calls == []  # the fast paths
    with ossrl.deterministic():
        assert deterministic_enabled()
        everything()
        with ossrl.deterministic(False):
            assert not deterministic_enabled()
        assert deterministic_enabled()
    assert set(calls) == {"linear", "rms_norm", "sink_attention", "paged_decode_attention", "moe_experts"}
    assert not deterministic_enabled()
    try:
        assert ossrl.set_deterministic(True) is False and ossrl.is_deterministic()
    finally:
        common.set_deterministic_flag(False)
    with pytest.raises(RuntimeError), ossrl.deterministic():
        raise RuntimeError("the mode comes back even on error")
    assert not deterministic_enabled()
