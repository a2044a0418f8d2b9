"""MXFP4 experts stay packed through training: every expert GEMM takes the in-register kernel, and a GEMM whose input
needs a gradient runs the dX kernel in the backward (dX = dY @ W_e); one whose input is frozen runs none. The
kernels run in Triton's interpreter on CPU in fp32 (TRITON_INTERPRET=1, set in conftest) with the CUDA-only gates
opened; logits and LoRA gradients equal a dense reference."""

import copy
from contextlib import contextmanager

import pytest
import torch

from ossrl.kernels import moe, mxfp4_ref
from ossrl.model.checkpoint import quantize_experts
from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss
from ossrl.model.lora import LoraConfig, apply_lora, lora_parameters
from ossrl.model.mxfp4 import MXFP4Weight

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernel on CPU: needs TRITON_INTERPRET=1")

SHAPES = dict(vocab_size=64, num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
              sliding_window=4)  # fmt: skip
TOKENS = 6


def models(targets):
    """(MXFP4 experts + LoRA on ``targets``, the same with the experts dequantized to dense fp32 and frozen)."""
    torch.manual_seed(0)
    model = GptOss.from_config(GptOssConfig(**SHAPES), dtype=torch.float32, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3 if "sinks" in name or name.endswith("bias") else 0.1)
    quantize_experts(model)
    apply_lora(model, LoraConfig(r=2, alpha=4, targets=targets), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in lora_parameters(model):  # B non-zero, so every LoRA factor gets a gradient
            p.normal_(0, 0.2)
    dense = copy.deepcopy(model)
    for layer in dense.model.layers:
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name).dequantize(torch.float32)
            delattr(experts, name)
            setattr(experts, name, torch.nn.Parameter(weight, requires_grad=False))
    assert isinstance(model.model.layers[0].mlp.experts.down_proj, MXFP4Weight)
    return model, dense


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
    model, dense = models(("gate_up_proj",))
    with kernel_on_cpu(monkeypatch) as (forward, backward):
        logits, grads = loss_and_grads(model)
    assert forward == [(ROWS, H), (ROWS, I)] * 2  # every GEMM, with or without a gradient, stays packed
    # Backward, last layer first: layer 1's down (dY [R, H]) and gate_up (its x depends on layer 0's LoRA), then
    # layer 0's down (h carries the LoRA's gradient); layer 0's gate_up input is frozen: no dX.
    assert backward == [(ROWS, H), (ROWS, 2 * I), (ROWS, H)]
    check_against_dense(model, dense, logits, grads)


def test_lora_on_down_only_needs_no_dx_in_the_first_layer(monkeypatch):
    model, dense = models(("down_proj",))
    with kernel_on_cpu(monkeypatch) as (forward, backward):
        logits, grads = loss_and_grads(model)
    assert forward == [(ROWS, H), (ROWS, I)] * 2
    assert backward == [(ROWS, H), (ROWS, 2 * I)]  # layer 0's h needs no gradient: the LoRA adds beside the GEMM
    check_against_dense(model, dense, logits, grads)


def test_no_grad_passes_send_every_gemm_through_the_kernel(monkeypatch):
    model, dense = models(("gate_up_proj", "down_proj"))
    ids = torch.arange(TOKENS)
    with kernel_on_cpu(monkeypatch) as (forward, backward), torch.no_grad():
        got = model(ids)
    assert forward == [(ROWS, H), (ROWS, I)] * SHAPES["num_hidden_layers"] and backward == []
    with torch.no_grad():
        torch.testing.assert_close(got, dense(ids), rtol=1e-5, atol=1e-5)
