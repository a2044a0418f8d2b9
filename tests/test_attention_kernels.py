"""Triton attention with sinks (training fwd + bwd) against a float64 naive oracle and the torch reference.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before Triton is imported):
fp32 and fp16 only (bf16 reads as garbage there) and small shapes (it is slow). With CUDA the same cases run in bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

pytest.importorskip("triton")

from ossrl.kernels import sink_attention, sink_attention_ref  # noqa: E402
from ossrl.kernels.attention_triton import sink_attention_triton  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclass(frozen=True)
class Case:
    lens: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    window: int | None
    sinks: tuple[float, ...]  # cycled over the q heads
    dtype: torch.dtype  # the CPU (interpreter) dtype; on GPU every case also runs in bf16

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"lens{list(self.lens)}-h{self.hq}/{self.hkv}-d{self.d}-w{self.window}-s{self.sinks[0]:+g}-{dt}"


CASES = [
    Case((37, 1, 70, 16), 4, 2, 16, None, (0.5, -1.0), torch.float32),
    Case((37, 1, 70, 16), 4, 2, 16, 5, (0.5, -1.0), torch.float16),
    Case((64,), 8, 1, 32, 40, (-2.0, 3.0, 0.0, 1.0), torch.float32),
    Case((1, 2, 3, 45), 2, 2, 16, 1, (0.0,), torch.float16),  # window 1: each query sees itself only
    Case((33, 47), 1, 1, 64, None, (-30.0,), torch.float32),  # sink negligible
    Case((20, 50), 8, 4, 16, 17, (8.0, -8.0), torch.float16),  # sink dominates in some heads
    Case((100,), 4, 1, 16, 33, (20.0, -30.0, 2.0, 0.0), torch.float32),  # window not a multiple of any block
    Case((0, 10, 0, 31), 2, 1, 32, None, (1.0, -1.0), torch.float16),  # empty sequences in the pack
]
GPU_CASES = [
    Case((1000, 17, 3000, 128), 64, 8, 64, None, (0.5, -3.0, 2.0), torch.bfloat16),
    Case((1000, 17, 3000, 128), 64, 8, 64, 128, (0.5, -3.0, 2.0), torch.bfloat16),
    Case((700, 300), 16, 2, 128, 200, (1.0, -1.0), torch.bfloat16),
]
PARAMS = [pytest.param(c, "cpu", c.dtype, id=f"cpu-{c}", marks=needs_interpreter) for c in CASES]
PARAMS += [  # GPU: every case in bf16, two in fp16 and fp32 too (each dtype/shape combination is a compile)
    pytest.param(c, "cuda", dt, id=f"cuda-{str(dt)[6:]}-{c}", marks=[pytest.mark.gpu, needs_cuda])
    for c, dt in [(c, torch.bfloat16) for c in CASES + GPU_CASES]
    + [(c, dt) for c in CASES[:2] for dt in (torch.float16, torch.float32)]
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # relative L2 error vs float64


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(case.lens)
    q = torch.randn(t, case.hq, case.d, generator=gen).to(device, dtype)
    k = torch.randn(t, case.hkv, case.d, generator=gen).to(device, dtype)
    v = torch.randn(t, case.hkv, case.d, generator=gen).to(device, dtype)
    sinks = torch.tensor([case.sinks[i % len(case.sinks)] for i in range(case.hq)], device=device)
    cu = torch.tensor([0, *torch.tensor(case.lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, sinks, cu, max(case.lens)


def naive_sink_attention(q, k, v, sinks, cu_seqlens, window, scale=None):
    """Float64 oracle: full [L, L] scores per sequence, the sink as an extra softmax column that is then dropped."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    outs = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:], strict=False):
        n = b - a
        qs, ks, vs = q[a:b].double(), k[a:b].double(), v[a:b].double()
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        i = torch.arange(n, device=q.device).view(-1, 1)
        j = torch.arange(n, device=q.device).view(1, -1)
        visible = (j <= i) & ((j > i - window) if window is not None else True)
        scores = scores.masked_fill(~visible, float("-inf"))
        sink_col = sinks.double().view(hq, 1, 1).expand(hq, n, 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
        outs.append(torch.einsum("hij,jhd->ihd", probs, vs))
    return torch.cat(outs) if outs else q.double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads_of(fn, inputs, dout):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs[:4]]
    out = fn(*leaves, *inputs[4:])
    return out, torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("case,device,dtype", PARAMS)
def test_triton_matches_float64_oracle(case: Case, device: str, dtype: torch.dtype) -> None:
    q, k, v, sinks, cu, max_len = make_inputs(case, device, dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out, grads = grads_of(sink_attention_triton, (q, k, v, sinks, cu, max_len, case.window), dout)
    # The oracle sees exactly the kernel's (rounded) inputs, in float64.
    q64, k64, v64, s64 = (x.double() for x in (q, k, v, sinks))
    out64, grads64 = grads_of(naive_sink_attention, (q64, k64, v64, s64, cu, case.window), dout.double())
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, out64) < tol
    for name, g, g64 in zip(("dq", "dk", "dv", "dsink"), grads, grads64, strict=True):
        assert g.dtype == (sinks.dtype if name == "dsink" else dtype) and g.shape == g64.shape, name
        # dsink sums terms of both signs (delta_i = dO_i . O_i, with O rounded to the input dtype): looser.
        assert rel_err(g, g64) < (3 * tol if name == "dsink" else tol), f"{name}: {rel_err(g, g64):.2e}"
    # The torch reference agrees with the kernel in the kernel's own dtype.
    ref = sink_attention_ref(q, k, v, sinks, cu, max_len, case.window)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_reference_matches_oracle(case: Case) -> None:
    # The reference does its softmax math in fp32 whatever the input dtype, hence 1e-6 and not 1e-12.
    q, k, v, sinks, cu, max_len = make_inputs(case, "cpu", torch.float64)
    # Seeded like the inputs: drawn from the global RNG, the outcome depended on which tests ran before.
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, grads = grads_of(sink_attention_ref, (q, k, v, sinks, cu, max_len, case.window), dout)
    out64, grads64 = grads_of(naive_sink_attention, (q, k, v, sinks, cu, case.window), dout)
    assert rel_err(out, out64) < 1e-6
    for g, g64 in zip(grads, grads64, strict=True):
        assert rel_err(g, g64) < 1e-6


@pytest.mark.parametrize("window", [None, 2])
def test_gradcheck(window: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(7, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    sinks = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    # Exact float64 gradcheck of the oracle the kernels are tested against ...
    naive = lambda q, k, v, s: naive_sink_attention(q, k, v, s, cu, window)  # noqa: E731
    assert torch.autograd.gradcheck(naive, (q, k, v, sinks))
    # ... and of the reference, whose inner math is fp32: a coarser step and tolerance.
    ref = lambda q, k, v, s: sink_attention_ref(q, k, v, s, cu, 4, window)  # noqa: E731
    assert torch.autograd.gradcheck(ref, (q, k, v, sinks), eps=1e-3, atol=2e-3, rtol=2e-3)


@needs_interpreter
def test_backward_is_deterministic() -> None:
    case = CASES[1]
    q, k, v, sinks, cu, max_len = make_inputs(case, "cpu", case.dtype)
    dout = torch.randn_like(q)
    first = grads_of(sink_attention_triton, (q, k, v, sinks, cu, max_len, case.window), dout)[1]
    second = grads_of(sink_attention_triton, (q, k, v, sinks, cu, max_len, case.window), dout)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_dispatch_on_cpu_is_the_reference() -> None:
    q, k, v, sinks, cu, max_len = make_inputs(CASES[0], "cpu", torch.float32)
    assert torch.equal(
        sink_attention(q, k, v, sinks, cu, max_len, 5), sink_attention_ref(q, k, v, sinks, cu, max_len, 5)
    )


def _bad(**changes):
    q, k, v, sinks, cu, max_len = make_inputs(CASES[0], "cpu", torch.float32)
    args = dict(q=q, k=k, v=v, sinks=sinks, cu_seqlens=cu, max_seqlen=max_len, window=None)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(k=torch.randn(124, 3, 16), v=torch.randn(124, 3, 16)), "multiple of kv heads"),
        (dict(k=torch.randn(124, 2, 16, dtype=torch.float16)), "share one floating dtype"),
        (dict(q=torch.randn(124, 4, 24), k=torch.randn(124, 2, 24), v=torch.randn(124, 2, 24)), "head dims"),
        (
            dict(
                q=torch.randn(124, 4, 16).double(),
                k=torch.randn(124, 2, 16).double(),
                v=torch.randn(124, 2, 16).double(),
            ),
            "supports",
        ),
        (dict(q=torch.randn(124, 4)), r"must be \[T, H, D\]"),
        (dict(v=torch.randn(120, 2, 16)), "k and v must be"),
        (dict(sinks=torch.zeros(2)), "sinks must be"),
        (dict(cu_seqlens=torch.tensor([1, 38, 39, 109, 124], dtype=torch.int32)), "start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 38, 30, 109, 124], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 38, 39, 109, 120], dtype=torch.int32)), "must equal the number of tokens"),
        (dict(cu_seqlens=torch.tensor([0.0, 124.0])), "int32"),
        (dict(max_seqlen=64), "smaller than the longest"),
        (dict(window=0), "window"),
    ],
)
def test_bad_inputs_raise_before_launch(changes: dict, match: str) -> None:
    args = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        sink_attention_triton(**args)


@needs_interpreter
def test_validation_is_cached_per_pack_but_sees_changes() -> None:
    case = Case((5, 3), 1, 1, 16, None, (0.0,), torch.float32)
    q, k, v, sinks, cu, max_len = make_inputs(case, "cpu", torch.float32)
    sink_attention_triton(q, k, v, sinks, cu, max_len)
    sink_attention_triton(q, k, v, sinks, cu, max_len)  # same pack: no re-read of cu_seqlens
    cu[1] = 9  # an in-place change bumps the version counter: validated again
    with pytest.raises(ValueError, match="non-decreasing"):
        sink_attention_triton(q, k, v, sinks, cu, max_len)
    with pytest.raises(ValueError, match="smaller than the longest"):
        sink_attention_triton(q, k, v, sinks, torch.tensor([0, 8], dtype=torch.int32), max_len)
