"""The in-register MXFP4 kernel has no backward, so ``moe_experts`` decides for each of the two expert GEMMs from its
own input whether the kernel may run: with a LoRA on gate_up_proj only, gate_up's frozen input takes the kernel while
down_proj, whose input carries the LoRA's gradient, dequantizes. The kernel runs in Triton's interpreter on CPU in
fp32 (TRITON_INTERPRET=1, set in conftest) with the CUDA-only gates opened; gradients equal a dense reference."""

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
    """Open the kernel's CUDA-only gates (its self-check, the grouped GEMM that selects the sorted path); yields
    the list that collects the (rows, in) shape of every GEMM the kernel runs."""
    calls = []
    triton_op = mxfp4_ref._triton_op

    def spy(x, blocks, scales, counts):
        calls.append(tuple(x.shape))
        return triton_op(x, blocks, scales, counts)

    with monkeypatch.context() as m:
        m.setattr(mxfp4_ref, "mxfp4_kernel_works", lambda device, dtype: True)  # as on CUDA after the self-check
        m.setattr(moe, "_grouped_mm_works", lambda device, dtype: True)  # as on CUDA in bf16
        m.setattr(mxfp4_ref, "_triton_op", spy)
        yield calls


ROWS, H, I = TOKENS * SHAPES["num_experts_per_tok"], SHAPES["hidden_size"], SHAPES["intermediate_size"]


def test_lora_on_gate_up_only_sends_down_proj_through_the_dequantizing_path(monkeypatch):
    model, dense = models(("gate_up_proj",))
    with kernel_on_cpu(monkeypatch) as calls:
        logits, grads = loss_and_grads(model)
    # Layer 0: x is frozen, so gate_up takes the kernel; h carries the LoRA's gradient, so down_proj does not.
    # Layer 1: x already depends on layer 0's LoRA, so neither GEMM does.
    assert calls == [(ROWS, H)]
    want_logits, want = loss_and_grads(dense)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert all(g.abs().max() > 0 for g in want)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_lora_on_down_only_lets_both_frozen_gemms_of_the_first_layer_take_the_kernel(monkeypatch):
    model, dense = models(("down_proj",))
    with kernel_on_cpu(monkeypatch) as calls:
        logits, grads = loss_and_grads(model)
    assert calls == [(ROWS, H), (ROWS, I)]  # layer 0's h needs no gradient: the LoRA adds beside the GEMM
    want_logits, want = loss_and_grads(dense)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert all(g.abs().max() > 0 for g in want)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_no_grad_passes_send_every_gemm_through_the_kernel(monkeypatch):
    model, dense = models(("gate_up_proj", "down_proj"))
    ids = torch.arange(TOKENS)
    with kernel_on_cpu(monkeypatch) as calls, torch.no_grad():
        got = model(ids)
    assert calls == [(ROWS, H), (ROWS, I)] * SHAPES["num_hidden_layers"]
    with torch.no_grad():
        torch.testing.assert_close(got, dense(ids), rtol=1e-5, atol=1e-5)
