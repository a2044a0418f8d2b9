"""MXFP4 experts stay packed through training: every expert GEMM takes the in-register kernel, and a GEMM whose input
needs a gradient runs the dX kernel in the backward (dX = dY @ W_e); one whose input is frozen runs none. The
kernels run in Triton's interpreter on CPU in fp32 (TRITON_INTERPRET=1, set in conftest) with the CUDA-only gates
opened; logits and LoRA gradients equal a dense reference."""

from contextlib import contextmanager

import pytest
import torch
from mxfp4_models import SHAPES, mxfp4_and_dense

from ossrl.kernels import moe, mxfp4_ref
from ossrl.model.lora import lora_parameters

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernel on CPU: needs TRITON_INTERPRET=1")

TOKENS = 6


def loss_and_grads(model):
    ids = torch.randint(0, SHAPES["vocab_size"], (TOKENS,), generator=torch.Generator().manual_seed(2))
    logits = model(ids)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    loss = (logits * weights).sum()
    return logits.detach(), torch.autograd.grad(loss, lora_parameters(model))


@contextmanager
def kernel_on_cpu(monkeypatch):
    """Open the kernels' CUDA-only gates (their self-check, the grouped GEMM that selects the sorted path); yields
    (forward calls, dX calls): the shape of the input (x or dY) of every GEMM each kernel runs."""
    forward, backward = [], []
    triton_op, triton_dx_op = mxfp4_ref._triton_op, mxfp4_ref._triton_dx_op

    def spy(op, calls):
        return lambda x, *args: calls.append(tuple(x.shape)) or op(x, *args)

    with monkeypatch.context() as m:
        m.setattr(mxfp4_ref, "mxfp4_kernel_works", lambda device, dtype: True)  # as on CUDA after the self-check
        m.setattr(moe, "_grouped_mm_works", lambda device, dtype: True)  # as on CUDA in bf16
        m.setattr(mxfp4_ref, "_triton_op", spy(triton_op, forward))
        m.setattr(mxfp4_ref, "_triton_dx_op", spy(triton_dx_op, backward))
        yield forward, backward


ROWS, H, I = TOKENS * SHAPES["num_experts_per_tok"], SHAPES["hidden_size"], SHAPES["intermediate_size"]


def check_against_dense(model, dense, logits, grads):
    want_logits, want = loss_and_grads(dense)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert all(g.abs().max() > 0 for g in want)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_lora_on_gate_up_only_runs_the_dx_kernel_where_a_gradient_reaches_the_gemm_input(monkeypatch):
    model, dense = mxfp4_and_dense(("gate_up_proj",))
    with kernel_on_cpu(monkeypatch) as (forward, backward):
        logits, grads = loss_and_grads(model)
    assert forward == [(ROWS, H), (ROWS, I)] * 2  # every GEMM, with or without a gradient, stays packed
    # Backward, last layer first: layer 1's down (dY [R, H]) and gate_up (its x depends on layer 0's LoRA), then
    # layer 0's down (h carries the LoRA's gradient); layer 0's gate_up input is frozen: no dX.
    assert backward == [(ROWS, H), (ROWS, 2 * I), (ROWS, H)]
    check_against_dense(model, dense, logits, grads)


def test_lora_on_down_only_needs_no_dx_in_the_first_layer(monkeypatch):
    model, dense = mxfp4_and_dense(("down_proj",))
    with kernel_on_cpu(monkeypatch) as (forward, backward):
        logits, grads = loss_and_grads(model)
    assert forward == [(ROWS, H), (ROWS, I)] * 2
    assert backward == [(ROWS, H), (ROWS, 2 * I)]  # layer 0's h needs no gradient: the LoRA adds beside the GEMM
    check_against_dense(model, dense, logits, grads)


def test_no_grad_passes_send_every_gemm_through_the_kernel(monkeypatch):
    model, dense = mxfp4_and_dense(("gate_up_proj", "down_proj"))
    ids = torch.arange(TOKENS)
    with kernel_on_cpu(monkeypatch) as (forward, backward), torch.no_grad():
        got = model(ids)
    assert forward == [(ROWS, H), (ROWS, I)] * SHAPES["num_hidden_layers"] and backward == []
    with torch.no_grad():
        torch.testing.assert_close(got, dense(ids), rtol=1e-5, atol=1e-5)
