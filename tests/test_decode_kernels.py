"""Paged decode/append attention with sinks: Triton kernel vs torch reference vs the training reference.

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported), fp32 and
fp16 only and small shapes; with CUDA the same cases run in bf16 too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

pytest.importorskip("triton")

from ossrl.kernels import paged_decode_attention, paged_decode_attention_ref, sink_attention_ref  # noqa: E402
from ossrl.kernels.decode_triton import paged_decode_attention_triton  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclass(frozen=True)
class Case:
    lens: tuple[int, ...]  # tokens in each sequence's cache, new ones included
    q_lens: tuple[int, ...]  # new tokens of each sequence
    hq: int
    hkv: int
    d: int
    page_size: int
    window: int | None
    kv_chunk: int
    dtype: torch.dtype  # the CPU (interpreter) dtype

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (f"lens{list(self.lens)}-q{list(self.q_lens)}-h{self.hq}/{self.hkv}-d{self.d}-p{self.page_size}"
                f"-w{self.window}-c{self.kv_chunk}-{dt}")  # fmt: skip


CASES = [
    Case((50, 3, 100, 17), (1, 3, 5, 0), 8, 2, 16, 8, None, 32, torch.float32),
    Case((50, 3, 100, 17), (1, 3, 5, 2), 8, 2, 16, 8, 7, 32, torch.float16),
    Case((130,), (1,), 8, 1, 32, 16, 40, 16, torch.float32),  # window spans three chunks
    Case((1, 64, 33), (1, 9, 33), 4, 4, 16, 4, None, 16, torch.float16),  # a whole prompt appended at once
    Case((75, 20), (2, 1), 3, 1, 64, 32, 33, 64, torch.float32),  # a group of 3 q heads (not a power of two)
]
GPU_CASES = [
    Case((4000, 1, 130, 2049, 700), (1, 1, 4, 1, 1), 64, 8, 64, 16, None, 256, torch.bfloat16),
    Case((4000, 1, 130, 2049, 700), (1, 1, 4, 1, 1), 64, 8, 64, 16, 128, 256, torch.bfloat16),
    Case((3000, 500), (300, 17), 64, 8, 64, 64, None, 256, torch.bfloat16),
]
PARAMS = [pytest.param(c, "cpu", c.dtype, id=f"cpu-{c}", marks=needs_interpreter) for c in CASES]
PARAMS += [  # GPU: every case in bf16, one in fp32 too
    pytest.param(c, "cuda", dt, id=f"cuda-{str(dt)[6:]}-{c}", marks=[pytest.mark.gpu, needs_cuda])
    for c, dt in [(c, torch.bfloat16) for c in CASES + GPU_CASES] + [(CASES[0], torch.float32)]
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative L2 error


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int = 0):
    """A paged cache holding each sequence's K/V at shuffled pages, plus the per-sequence K/V unpaged (packed)."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // case.page_size) for n in case.lens]
    num_pages = sum(pages_per_seq) + 3
    k_cache = torch.randn(num_pages, case.page_size, case.hkv, case.d, generator=gen).to(device, dtype)
    v_cache = torch.randn(num_pages, case.page_size, case.hkv, case.d, generator=gen).to(device, dtype)
    order = torch.randperm(num_pages, generator=gen)
    page_table = torch.full((len(case.lens), max(pages_per_seq) + 1), -1, dtype=torch.int32)  # unused: -1
    k_seqs, v_seqs, first = [], [], 0
    for b, (n, p) in enumerate(zip(case.lens, pages_per_seq, strict=True)):
        page_table[b, :p] = order[first : first + p].int()
        first += p
        ids = page_table[b, :p].long().to(device)
        k_seqs.append(k_cache[ids].reshape(-1, case.hkv, case.d)[:n])
        v_seqs.append(v_cache[ids].reshape(-1, case.hkv, case.d)[:n])
    q = torch.randn(sum(case.q_lens), case.hq, case.d, generator=gen).to(device, dtype)
    sinks = torch.linspace(-4.0, 6.0, case.hq, device=device)
    cu_q = torch.tensor([0, *torch.tensor(case.q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor(case.lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, page_table.to(device), lens, cu_q, max(case.q_lens), sinks, k_seqs, v_seqs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case,device,dtype", PARAMS)
def test_kernel_matches_references(case: Case, device: str, dtype: torch.dtype) -> None:
    q, kc, vc, pt, lens, cu_q, max_q, sinks, k_seqs, v_seqs = make_inputs(case, device, dtype)
    out = paged_decode_attention_triton(q, kc, vc, pt, lens, cu_q, max_q, sinks, case.window, kv_chunk=case.kv_chunk)
    ref = paged_decode_attention_ref(q, kc, vc, pt, lens, cu_q, max_q, sinks, case.window)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref.float()) < TOLERANCE[dtype]

    # The training reference over each whole sequence, with the new queries placed at its last positions, agrees.
    for b, (n, nq) in enumerate(zip(case.lens, case.q_lens, strict=True)):
        if nq == 0:
            continue
        q_full = torch.zeros(n, case.hq, case.d, device=device, dtype=dtype)
        q_full[n - nq :] = q[cu_q[b] : cu_q[b + 1]]
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        full = sink_attention_ref(q_full, k_seqs[b], v_seqs[b], sinks, cu, n, case.window)[n - nq :]
        assert rel_err(out[cu_q[b] : cu_q[b + 1]], full.float()) < TOLERANCE[dtype]


@needs_interpreter
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=str)
def test_grid_sized_for_graph_capture_gives_the_same_result(case: Case, monkeypatch) -> None:
    """Under CUDA graph capture the grid covers the page table's whole capacity (lengths cannot be read); the
    programs past a sequence's end must change nothing."""
    from ossrl.kernels import decode_triton

    q, kc, vc, pt, lens, cu_q, max_q, sinks, _, _ = make_inputs(case, "cpu", case.dtype)
    pt = torch.cat([pt.clamp_min(0), torch.zeros(pt.shape[0], 40, dtype=pt.dtype)], 1)  # the engine's wide tables
    args = (q, kc, vc, pt, lens, cu_q, max_q, sinks, case.window)
    dynamic = paged_decode_attention_triton(*args, kv_chunk=case.kv_chunk)
    monkeypatch.setattr(decode_triton, "_capturing", lambda q: True)
    assert torch.equal(paged_decode_attention_triton(*args, kv_chunk=case.kv_chunk), dynamic)


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])],
)
def test_result_does_not_depend_on_the_batch(device: str) -> None:
    case = CASES[1] if device == "cpu" else GPU_CASES[1]
    dtype = case.dtype
    q, kc, vc, pt, lens, cu_q, max_q, sinks, _, _ = make_inputs(case, device, dtype)
    full = paged_decode_attention_triton(q, kc, vc, pt, lens, cu_q, max_q, sinks, case.window, kv_chunk=case.kv_chunk)
    again = paged_decode_attention_triton(q, kc, vc, pt, lens, cu_q, max_q, sinks, case.window, kv_chunk=case.kv_chunk)
    assert torch.equal(full, again)  # deterministic
    for b in range(len(case.lens)):  # each sequence alone gives bitwise the same rows
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        alone_cu = torch.tensor([0, rows.stop - rows.start], dtype=torch.int32, device=device)
        alone = paged_decode_attention_triton(q[rows], kc, vc, pt[b : b + 1], lens[b : b + 1], alone_cu,
                                              max(1, rows.stop - rows.start), sinks, case.window,
                                              kv_chunk=case.kv_chunk)  # fmt: skip
        assert torch.equal(alone, full[rows]), f"sequence {b}"


def test_dispatch_on_cpu_is_the_reference() -> None:
    case = CASES[0]
    q, kc, vc, pt, lens, cu_q, max_q, sinks, _, _ = make_inputs(case, "cpu", torch.float32)
    out = paged_decode_attention(q, kc, vc, pt, lens, cu_q, max_q, sinks, 7)
    assert torch.equal(out, paged_decode_attention_ref(q, kc, vc, pt, lens, cu_q, max_q, sinks, 7))


def _bad_args(**changes):
    q, kc, vc, pt, lens, cu_q, max_q, sinks, _, _ = make_inputs(CASES[0], "cpu", torch.float32)
    args = dict(q=q, k_cache=kc, v_cache=vc, page_table=pt, seq_lens=lens, cu_q_lens=cu_q, max_q_len=max_q,
                sinks=sinks, window=None)  # fmt: skip
    for key, value in changes.items():
        args[key] = value(args[key]) if callable(value) else value
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(q=lambda q: q[:, :3]), "multiple of kv heads"),
        (dict(q=lambda q: q.half()), "share one floating dtype"),
        (dict(v_cache=lambda v: v[:, :4]), "k_cache and v_cache"),
        (dict(q=lambda q: q[..., :12], k_cache=lambda k: k[..., :12], v_cache=lambda v: v[..., :12]), "head dims"),
        (dict(sinks=lambda s: s[:2]), "sinks must be"),
        (dict(page_table=lambda p: p.float()), "page_table"),
        (dict(seq_lens=lambda s: s[:2]), "seq_lens must be"),
        (dict(cu_q_lens=lambda c: c + 1), "cu_q_lens must start at 0"),
        (dict(cu_q_lens=lambda c: torch.tensor([0, 1, 4, 3, 9], dtype=torch.int32)), "non-decreasing"),
        (dict(max_q_len=2), "max_q_len"),
        (dict(seq_lens=lambda s: torch.tensor([50, 2, 100, 17], dtype=torch.int32)), "must count its 3 new tokens"),
        (dict(seq_lens=lambda s: torch.tensor([50, 3, 1000, 17], dtype=torch.int32)), "fit its"),
        (dict(page_table=lambda p: p.masked_fill(p == p[0, 0], 10_000)), "page ids"),
        (dict(window=0), "window"),
        (dict(kv_chunk=48), "kv_chunk"),
    ],
)
def test_bad_inputs_raise_before_launch(changes: dict, match: str) -> None:
    args = _bad_args(**changes)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_triton(**args)
