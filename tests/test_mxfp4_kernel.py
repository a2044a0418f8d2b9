"""The MXFP4 grouped GEMM that dequantizes in registers (``kernels/mxfp4_triton``) against its reference
(``kernels/mxfp4_ref``: dequantize, then a matmul per expert). Without CUDA the kernel runs in Triton's interpreter
(TRITON_INTERPRET=1, set in conftest), fp32 and fp16; bf16 and real shapes on a GPU."""

import pytest
import torch

from ossrl.kernels import moe, mxfp4_ref
from ossrl.kernels.mxfp4_format import check_mxfp4_grouped_inputs, dequantize_mxfp4
from ossrl.kernels.mxfp4_ref import mxfp4_grouped_matmul_ref
from ossrl.model.mxfp4 import MXFP4Weight

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_packed(experts: int, n: int, groups: int, device="cpu", scales=(122, 130), seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, n, groups, 16), dtype=torch.uint8, generator=gen)
    scale = torch.randint(*scales, (experts, n, groups), dtype=torch.uint8, generator=gen)
    return blocks.to(device), scale.to(device)


def triton_matmul(*args):
    from ossrl.kernels.mxfp4_triton import mxfp4_grouped_matmul_triton

    return mxfp4_grouped_matmul_triton(*args)


CASES = [  # counts per expert (ragged, empty experts, one expert), N outputs, K / 32
    ([3, 0, 20, 1], 40, 3),
    ([0, 0, 5], 16, 1),
    ([33], 70, 2),
    ([0, 0], 24, 2),  # no rows at all
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts,n,groups", CASES)
def test_kernel_matches_the_reference(counts, n, groups, dtype):
    blocks, scales = random_packed(len(counts), n, groups, seed=n)
    x = torch.randn(sum(counts), groups * 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    counts = torch.tensor(counts)
    got, want = triton_matmul(x, blocks, scales, counts), mxfp4_grouped_matmul_ref(x, blocks, scales, counts)
    assert got.shape == want.shape == (x.shape[0], n) and got.dtype == dtype
    if want.numel():
        error = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert error < (1e-6 if dtype == torch.float32 else 1e-3)


@needs_interpreter
def test_in_register_dequantization_is_bitwise_the_references():
    """One-hot rows pick single weights out exactly (fp32, ieee dot): every code, at every scale up to 252 (above,
    6 * 2**(s - 127) overflows fp32 and 0 * inf in the dot is NaN)."""
    e = 253
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 1, 16).repeat(e, 1, 1, 1)  # 16 outputs x 16 bytes
    scales = torch.arange(e, dtype=torch.uint8).view(e, 1, 1).expand(e, 16, 1).contiguous()
    got = triton_matmul(torch.eye(32).repeat(e, 1), blocks, scales, torch.full((e,), 32)).view(e, 32, 16)
    assert torch.equal(got, dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2))  # W^T, all 512


@needs_interpreter
def test_moe_experts_through_the_kernel_match_the_dequantizing_path(monkeypatch):
    torch.manual_seed(0)
    e, h, i, n, k = 6, 64, 32, 9, 2
    up, down = MXFP4Weight.from_dense(torch.randn(e, h, 2 * i)), MXFP4Weight.from_dense(torch.randn(e, i, h))
    b1, b2 = torch.randn(e, 2 * i), torch.randn(e, h)
    x, ids = torch.randn(n, h), torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, k), -1)
    want = moe.moe_experts(x, ids, weights, up, b1, down, b2)
    calls, triton_op = [], mxfp4_ref._triton_op
    monkeypatch.setattr(mxfp4_ref, "mxfp4_kernel_works", lambda device, dtype: True)  # as on CUDA
    monkeypatch.setattr(moe, "_grouped_mm_works", lambda device, dtype: True)
    monkeypatch.setattr(mxfp4_ref, "_triton_op", lambda x, *args: calls.append(x.shape) or triton_op(x, *args))
    got = moe.moe_experts(x, ids, weights, up, b1, down, b2)
    assert calls == [(n * k, h), (n * k, i)]  # both expert GEMMs went through the kernel
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # outputs ~10: fp32 summation order


@pytest.mark.parametrize(
    "change,match",
    [
        ({"x": torch.randn(4, 64)}, "x has 64 columns"),
        ({"counts": torch.tensor([1.0, 3.0])}, "counts must be integer"),
        ({"blocks": torch.zeros(2, 8, 3, 16)}, "must be uint8"),
        ({"scales": torch.zeros(2, 8, 2, dtype=torch.uint8)}, "are not"),
    ],
)
def test_bad_inputs_are_clear_errors(change, match):
    blocks, scales = random_packed(2, 8, 3)
    args = {"x": torch.randn(4, 96), "blocks": blocks, "scales": scales, "counts": torch.tensor([1, 3])} | change
    with pytest.raises(ValueError, match=match):
        check_mxfp4_grouped_inputs(**args)


@pytest.mark.gpu
@needs_cuda
def test_kernel_on_gpu_at_gpt_oss_shapes():
    """bf16, one gpt-oss-20b gate_up matrix set (32 experts, 2880 -> 5760), 64 tokens x top-4, and the self-check."""
    assert mxfp4_ref.mxfp4_kernel_works(torch.device("cuda"), torch.bfloat16)
    blocks, scales = random_packed(32, 5760, 90, device="cuda")
    counts = torch.bincount(torch.randint(0, 32, (256,)), minlength=32).cuda()
    x = torch.randn(256, 2880, device="cuda", dtype=torch.bfloat16)
    got, want = triton_matmul(x, blocks, scales, counts), mxfp4_grouped_matmul_ref(x, blocks, scales, counts)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
