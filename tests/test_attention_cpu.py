"""The fused CPU path for attention with sinks (attention_cpu) against the plain-torch reference, gradients
included, and the dispatch that picks it."""

from __future__ import annotations

import pytest
import torch

from ossrl.kernels import attention_cpu, sink_attention, sink_attention_ref

pytestmark = pytest.mark.skipif(not attention_cpu.available(), reason="this torch lacks the fused CPU attention ops")

CASES = [  # lens, hq, hkv, d, window, sinks (cycled over heads)
    ((37, 1, 70, 16), 4, 2, 16, None, (0.5, -1.0)),
    ((37, 1, 70, 16), 4, 2, 16, 5, (0.5, -1.0)),
    ((64,), 8, 1, 32, 40, (-2.0, 3.0, 0.0, 1.0)),
    ((1, 2, 3, 45), 2, 2, 16, 1, (0.0,)),  # window 1: each query sees itself only
    ((33, 47), 1, 1, 64, None, (-30.0,)),  # sink negligible
    ((20, 50), 8, 4, 16, 17, (8.0, -8.0)),  # sink dominates in some heads
    ((30, 0, 41, 0, 25), 2, 1, 32, None, (1.0, -1.0)),  # empty sequences in the pack
    ((60, 50, 55), 4, 2, 32, 100, (0.3,)),  # window wider than every sequence: plain causal
]


def make_inputs(lens, hq, hkv, d, sinks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hkv, hkv))
    s = torch.tensor([sinks[i % len(sinks)] for i in range(hq)])
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, s, cu, max(lens)


def value_and_grads(fn, q, k, v, s, rest, dout):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, s)]
    out = fn(*leaves, *rest)
    return (out, *torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("lens,hq,hkv,d,window,sinks", CASES)
def test_cpu_path_matches_reference_with_gradients(lens, hq, hkv, d, window, sinks):
    q, k, v, s, cu, longest = make_inputs(lens, hq, hkv, d, sinks)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    ours = value_and_grads(attention_cpu.sink_attention_cpu, q, k, v, s, (cu, longest, window), dout)
    ref = value_and_grads(sink_attention_ref, q, k, v, s, (cu, longest, window), dout)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsink"), ours, ref, strict=True):
        assert a.shape == b.shape, name
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


def test_softmax_scale_is_honoured():
    q, k, v, s, cu, longest = make_inputs((20, 31), 4, 2, 16, (0.5,))
    ours = attention_cpu.sink_attention_cpu(q, k, v, s, cu, longest, 7, 0.3)
    torch.testing.assert_close(ours, sink_attention_ref(q, k, v, s, cu, longest, 7, 0.3), rtol=1e-5, atol=1e-6)


def test_fits_only_where_it_pays_and_is_safe():
    q, *_ = make_inputs((10, 10), 2, 1, 16, (0.0,))
    assert attention_cpu.fits(q, [0, 10, 20], None)
    assert not attention_cpu.fits(q.half(), [0, 10, 20], None)  # fp32 only
    q_long, *_ = make_inputs((100, 2, 2, 2), 2, 1, 16, (0.0,))
    assert not attention_cpu.fits(q_long, [0, 100, 102, 104, 106], None)  # padding would more than double the work
    assert not attention_cpu.fits(q[:0], [0], None)  # empty pack
    q_huge = torch.empty(5000, 2, 16)
    assert not attention_cpu.fits(q_huge, [0, 5000], 128)  # the window mask would be 5000 x 5000
    assert attention_cpu.fits(q_huge, [0, 5000], None)


def test_dispatch_uses_the_cpu_path_and_still_checks_inputs(monkeypatch):
    q, k, v, s, cu, longest = make_inputs((20, 31), 4, 2, 16, (0.5,))
    calls = []
    real = attention_cpu.sink_attention_cpu
    monkeypatch.setattr(attention_cpu, "sink_attention_cpu", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(
        sink_attention(q, k, v, s, cu, longest, 5), sink_attention_ref(q, k, v, s, cu, longest, 5)
    )
    assert calls == [1]
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sink_attention(q, k[:, :1].expand(-1, 3, -1).contiguous(), v[:, :1].expand(-1, 3, -1).contiguous(), s, cu,
                       longest)  # fmt: skip
