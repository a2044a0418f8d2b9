"""The MXFP4 grouped GEMM: its plain-torch references and its entry point (the one dispatch), differentiable in x.

``mxfp4_grouped_matmul(x, blocks, scales, counts)``: rows of ``x`` [R, in] sorted by expert (``counts[e]`` rows for
expert e) times W_e^T, W stored in MXFP4 (layout and numerics: ``mxfp4_format``). Autograd goes through it to ``x``:
the input gradient is dX = dY @ W_e per expert (``mxfp4_grouped_matmul_dx``); the weights are frozen (no weight
gradient) and the backward needs no saved activation, only dY and the packed weights, so a training forward keeps
no dequantized copy of any expert. On CUDA in bf16/fp16, once a self-check on the device has passed, both directions
run the Triton kernels of ``mxfp4_triton`` (dequantizing in registers); elsewhere the references below dequantize
ONE expert at a time (never a whole layer) and multiply.

Every path is a ``torch.library`` custom op with a fake implementation (shapes only), so fake-tensor tracing
(``FakeTensorMode``, ``torch.compile``) runs through it: ``ossrl::mxfp4_grouped_matmul`` /
``ossrl::mxfp4_grouped_matmul_dx`` (Triton) and ``ossrl::mxfp4_grouped_matmul_ref`` /
``ossrl::mxfp4_grouped_matmul_dx_ref`` (references).
"""

from __future__ import annotations

import torch

from ossrl.kernels.common import planned_gpu, warn_once
from ossrl.kernels.mxfp4_format import check_mxfp4_grouped_dx_inputs, check_mxfp4_grouped_inputs, dequantize_mxfp4


def mxfp4_grouped_matmul_ref(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Reference: per expert, dequantize its weight W_e [N, K] to x's dtype and multiply (one expert's dense copy
    alive at a time; reads ``counts`` on the host). Returns [R, N] in x's dtype."""
    check_mxfp4_grouped_inputs(x, blocks, scales, counts)
    out = x.new_zeros(x.shape[0], blocks.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = x[start : start + n] @ dequantize_mxfp4(blocks[e], scales[e], x.dtype).T
        start += n
    return out


def mxfp4_grouped_matmul_dx_ref(
    grad: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Reference input gradient: grad (dY) [R, N] sorted like x -> dX [R, K], dX_e = dY_e @ W_e, one expert
    dequantized at a time. In grad's dtype."""
    check_mxfp4_grouped_dx_inputs(grad, blocks, scales, counts)
    out = grad.new_zeros(grad.shape[0], blocks.shape[2] * blocks.shape[3] * 2)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = grad[start : start + n] @ dequantize_mxfp4(blocks[e], scales[e], grad.dtype)
        start += n
    return out


# ---- the custom ops (each with a fake implementation: shapes only) ------------------------------------------------
@torch.library.custom_op("ossrl::mxfp4_grouped_matmul", mutates_args=())
def _triton_op(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The Triton forward as one opaque op: a ``torch.compile`` trace keeps it whole (no graph break)."""
    from ossrl.kernels.mxfp4_triton import mxfp4_grouped_matmul_triton

    return mxfp4_grouped_matmul_triton(x, blocks, scales, counts)


@torch.library.custom_op("ossrl::mxfp4_grouped_matmul_dx", mutates_args=())
def _triton_dx_op(grad: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The Triton input gradient (dX = dY @ W_e) as one opaque op."""
    from ossrl.kernels.mxfp4_triton import mxfp4_grouped_matmul_dx_triton

    return mxfp4_grouped_matmul_dx_triton(grad, blocks, scales, counts)


@torch.library.custom_op("ossrl::mxfp4_grouped_matmul_ref", mutates_args=())
def _ref_op(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``mxfp4_grouped_matmul_ref`` as an op: it reads ``counts`` on the host, which a fake tensor cannot."""
    return mxfp4_grouped_matmul_ref(x, blocks, scales, counts)


@torch.library.custom_op("ossrl::mxfp4_grouped_matmul_dx_ref", mutates_args=())
def _ref_dx_op(grad: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``mxfp4_grouped_matmul_dx_ref`` as an op."""
    return mxfp4_grouped_matmul_dx_ref(grad, blocks, scales, counts)


def _forward_fake(x, blocks, scales, counts):
    return x.new_empty(x.shape[0], blocks.shape[1])  # [R, out]


def _dx_fake(grad, blocks, scales, counts):
    return grad.new_empty(grad.shape[0], blocks.shape[2] * blocks.shape[3] * 2)  # [R, in]


for _op, _fake in ((_triton_op, _forward_fake), (_ref_op, _forward_fake), (_triton_dx_op, _dx_fake),
                   (_ref_dx_op, _dx_fake)):  # fmt: skip
    _op.register_fake(_fake)


class _PackedMatmul(torch.autograd.Function):
    """y = x @ W_e^T per group, differentiable in x only. Saves the packed weights and the group sizes (nothing
    computed from x), so the backward holds no activation and no dequantized weight."""

    @staticmethod
    def forward(ctx, x, blocks, scales, counts, kernel: bool):  # type: ignore[override]
        ctx.save_for_backward(blocks, scales, counts)
        ctx.kernel = kernel
        return (_triton_op if kernel else _ref_op)(x, blocks, scales, counts)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        blocks, scales, counts = ctx.saved_tensors
        dx = (_triton_dx_op if ctx.kernel else _ref_dx_op)(grad, blocks, scales, counts)
        return dx, None, None, None, None


# ---- dispatch ----------------------------------------------------------------------------------------------------
_KERNEL_WORKS: dict[tuple[torch.device, torch.dtype], bool] = {}


@torch.compiler.assume_constant_result  # a torch.compile trace takes the answer, never traces the self-check
def mxfp4_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels (forward and dX) run on ``device`` for ``dtype`` and agree with the references
    (checked once). Under a ``FakeTensorMode`` nothing can run: the answer is whether they would be tried (CUDA,
    bf16/fp16), not cached, unless a real check already answered. Planning (``ossrl.memory``): the GPU's answer."""
    if planned_gpu(device):
        return dtype in (torch.bfloat16, torch.float16)
    if (device, dtype) not in _KERNEL_WORKS:
        answer, checked = _self_check(device, dtype)
        if not checked:
            return answer
        _KERNEL_WORKS[device, dtype] = answer
    return _KERNEL_WORKS[device, dtype]


def _self_check(device: torch.device, dtype: torch.dtype) -> tuple[bool, bool]:
    """(works, really checked)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):  # where moe uses it (expert_path)
        return False, True
    if isinstance(torch.empty(0, device=device), torch._subclasses.fake_tensor.FakeTensor):  # a fake-tensor trace
        return True, False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(40, 96, device=device, dtype=dtype, generator=gen)
        grad = torch.randn(40, 80, device=device, dtype=dtype, generator=gen)
        blocks = torch.randint(0, 256, (3, 80, 3, 16), device=device, dtype=torch.uint8, generator=gen)
        scales = torch.randint(120, 130, (3, 80, 3), device=device, dtype=torch.uint8, generator=gen)
        counts = torch.tensor([17, 0, 23], device=device)
        for name, op, ref, inp in (("forward", _triton_op, mxfp4_grouped_matmul_ref, x),
                                   ("dX", _triton_dx_op, mxfp4_grouped_matmul_dx_ref, grad)):  # fmt: skip
            got, want = op(inp, blocks, scales, counts).float(), ref(inp, blocks, scales, counts).float()
            error = ((got - want).norm() / want.norm()).item()
            if error > 1e-2:
                warn_once("mxfp4_kernel", f"MXFP4 Triton {name} kernel disagrees with the reference on {device} "
                          f"{dtype} (relative error {error:.2e}); dequantizing one expert at a time")  # fmt: skip
                return False, True
        return True, True
    except Exception as err:  # any failure to build or run it: the reference path still works
        warn_once("mxfp4_kernel", f"MXFP4 Triton kernel unavailable on {device} {dtype} ({type(err).__name__}: "
                  f"{err}); dequantizing one expert at a time instead")  # fmt: skip
        return False, True


def mxfp4_grouped_matmul(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """x [R, K] (rows sorted by expert, ``counts`` [E] rows each) -> [R, N], y_e = x_e @ W_e^T in x's dtype.
    Differentiable in ``x`` (dX = dY @ W_e, no weight gradient). The Triton kernels where they work (CUDA,
    bf16/fp16, self-checked), the per-expert references elsewhere."""
    kernel = mxfp4_kernel_works(x.device, x.dtype)  # False off CUDA
    if torch.is_grad_enabled() and x.requires_grad:
        return _PackedMatmul.apply(x, blocks, scales, counts, kernel)
    return (_triton_op if kernel else _ref_op)(x, blocks, scales, counts)
