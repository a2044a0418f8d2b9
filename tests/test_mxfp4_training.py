"""MXFP4 experts stay packed through training (issue 13, item 1) and chunked MoE over long sequences.

- The Triton forward and input-gradient (dX = dY @ W_e) kernels against their references, in Triton's interpreter
  (TRITON_INTERPRET=1, set in conftest; fp32/fp16), ragged groups, empty experts, partial tiles.
- The differentiable op's gradient against dequantize-then-matmul autograd (fp64 gradcheck on the reference).
- LoRA gradients over MXFP4 experts (``moe_experts``, a tiny ``GptOss``, deterministic mode) against dense ones, and
  what autograd saves: never a dequantized expert.
- Chunked MoE (``chunk_tokens``) equals unchunked, values and gradients, and checkpoints each chunk.
- The issue's "must show": a LoRA forward+backward through MXFP4 experts of a 2-layer model (hidden 1024, 32
  experts) raises the process's peak memory by well under one layer's dense experts; gradients equal dense ones.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mxfp4_models import mxfp4_and_dense

from ossrl import deterministic
from ossrl.kernels import moe, mxfp4_ref, mxfp4_triton
from ossrl.kernels.mxfp4_format import dequantize_mxfp4
from ossrl.kernels.mxfp4_ref import mxfp4_grouped_matmul, mxfp4_grouped_matmul_dx_ref, mxfp4_grouped_matmul_ref
from ossrl.model.lora import lora_parameters
from ossrl.model.mxfp4 import MXFP4Weight

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")


def random_packed(experts: int, n: int, groups: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, n, groups, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(122, 130, (experts, n, groups), dtype=torch.uint8, generator=gen)
    return blocks, scales


def dense_grouped(x: torch.Tensor, blocks, scales, counts: list[int]) -> torch.Tensor:
    """Dequantize every expert, then a matmul per group: the autograd reference."""
    weights = dequantize_mxfp4(blocks, scales, x.dtype)  # [E, N, K]
    return torch.cat([part @ w.T for part, w in zip(x.split(counts), weights, strict=True)])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


CASES = [  # counts per expert (ragged, empty experts), N outputs, K / 32 (N, K not multiples of the tiles)
    ([3, 0, 20, 1], 40, 3),
    ([0, 0, 5], 16, 1),
    ([33], 70, 2),
    ([0, 7, 0], 24, 5),
    ([0, 0], 24, 2),  # no rows at all
]


# ---- the kernels against the references -------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts,n,groups", CASES)
@pytest.mark.parametrize("block_k", [32, 64])  # 64: K = 96 or 160 ends in a partial tile
def test_triton_forward_and_dx_match_the_references(counts, n, groups, dtype, block_k, monkeypatch):
    monkeypatch.setattr(mxfp4_triton, "INTERPRET_CONFIG", (16, 16, block_k, 1, 1))
    blocks, scales = random_packed(len(counts), n, groups, seed=n)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), groups * 32, generator=gen).to(dtype)
    grad = torch.randn(sum(counts), n, generator=gen).to(dtype)
    c = torch.tensor(counts)
    got = mxfp4_triton.mxfp4_grouped_matmul_triton(x, blocks, scales, c)
    got_dx = mxfp4_triton.mxfp4_grouped_matmul_dx_triton(grad, blocks, scales, c)
    want, want_dx = mxfp4_grouped_matmul_ref(x, blocks, scales, c), mxfp4_grouped_matmul_dx_ref(grad, blocks, scales, c)
    assert got.shape == want.shape == (x.shape[0], n) and got_dx.shape == want_dx.shape == x.shape
    assert got.dtype == got_dx.dtype == dtype
    if x.numel():
        limit = 1e-6 if dtype == torch.float32 else 1e-3
        assert relative_error(got, want) < limit and relative_error(got_dx, want_dx) < limit
        # and the references equal dequantize-the-layer-then-matmul
        weights = dequantize_mxfp4(blocks, scales, torch.float64)
        dense_dx = torch.cat([g @ w for g, w in zip(grad.double().split(counts), weights, strict=True)])
        assert relative_error(want_dx, dense_dx) < limit


@needs_interpreter
def test_dx_dequantizes_every_code_and_scale_bitwise():
    """dY one-hot over the outputs picks rows of W out exactly (fp32, ieee dot): every code at scales 0..252."""
    e = 253
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 1, 16).repeat(e, 1, 1, 1)  # 16 outputs x 32 inputs
    scales = torch.arange(e, dtype=torch.uint8).view(e, 1, 1).expand(e, 16, 1).contiguous()
    got = mxfp4_triton.mxfp4_grouped_matmul_dx_triton(torch.eye(16).repeat(e, 1), blocks, scales, torch.full((e,), 16))
    assert torch.equal(got.view(e, 16, 32), dequantize_mxfp4(blocks, scales, torch.float32))


def test_dx_inputs_are_checked():
    blocks, scales = random_packed(2, 8, 3)
    with pytest.raises(ValueError, match="grad has 9 columns but the weights give 8 outputs"):
        mxfp4_grouped_matmul_dx_ref(torch.randn(4, 9), blocks, scales, torch.tensor([1, 3]))


# ---- the differentiable op ---------------------------------------------------------------------------------------
def test_reference_op_passes_gradcheck_in_fp64():
    blocks, scales = random_packed(3, 10, 1, seed=3)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mxfp4_grouped_matmul(t, blocks, scales, counts), (x,))


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=needs_interpreter)])
def test_op_gradient_equals_dequantize_then_matmul_autograd(kernel, monkeypatch):
    if kernel:
        monkeypatch.setattr(mxfp4_ref, "mxfp4_kernel_works", lambda device, dtype: True)  # as on CUDA
    counts = [4, 0, 9, 1]
    blocks, scales = random_packed(4, 40, 3, seed=4)
    x = torch.randn(sum(counts), 96, requires_grad=True)
    grad = torch.randn(sum(counts), 40)
    (got,) = torch.autograd.grad(mxfp4_grouped_matmul(x, blocks, scales, torch.tensor(counts)), x, grad)
    (want,) = torch.autograd.grad(dense_grouped(x, blocks, scales, counts), x, grad)
    assert relative_error(got, want) < 1e-6


def test_the_backward_keeps_only_the_packed_weights():
    """Autograd saves the packed blocks/scales and the group sizes: nothing computed from x, no dense copy."""
    blocks, scales = random_packed(3, 40, 3)
    counts = torch.tensor([5, 0, 6])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = mxfp4_grouped_matmul(torch.randn(11, 96, requires_grad=True), blocks, scales, counts)
    assert y.requires_grad and {t.dtype for t in saved} <= {torch.uint8, torch.int64}
    assert sum(t.numel() for t in saved) == blocks.numel() + scales.numel() + counts.numel()


def test_fake_tensors_run_forward_and_backward_through_the_ops(monkeypatch):
    """The fake implementations: ``FakeTensorMode`` (H3's memory planner) traces the MXFP4 MoE and its backward
    without reading a value, on the grouped path a GPU takes (opened here on CPU), and caches no self-check."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    monkeypatch.setattr(moe, "_grouped_mm_works", lambda device, dtype: True)
    monkeypatch.setattr(mxfp4_ref, "_KERNEL_WORKS", {})
    with FakeTensorMode():
        x = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
        up, down = MXFP4Weight(*random_packed(4, 128, 2)), MXFP4Weight(*random_packed(4, 64, 2))
        lora = (torch.randn(4, 64, 4, requires_grad=True), torch.randn(4, 4, 128, requires_grad=True), 2.0)
        ids, weights = torch.randint(0, 4, (40, 2)), torch.rand(40, 2, dtype=torch.bfloat16)
        out = moe.moe_experts(x, ids, weights, up, torch.zeros(4, 128), down, torch.zeros(4, 64),
                              gate_up_lora=lora, chunk_tokens=16)  # fmt: skip
        out.float().sum().backward()
        assert isinstance(out, FakeTensor) and out.shape == (40, 64)
        assert x.grad.shape == x.shape and lora[0].grad.shape == lora[0].shape
        dx = torch.ops.ossrl.mxfp4_grouped_matmul_dx(
            torch.randn(40, 128), up.blocks, up.scales, torch.ones(4, dtype=torch.long)
        )
        assert dx.shape == (40, 64)
        assert mxfp4_ref.mxfp4_kernel_works(torch.device("cuda"), torch.bfloat16)  # would be tried on a GPU
    assert all(device.type != "cuda" for device, _ in mxfp4_ref._KERNEL_WORKS)  # no fake answer cached


# ---- LoRA over MXFP4 experts: gradients equal the dense reference ---------------------------------------------------
E, H, I, K = 6, 64, 32, 2


def packed_and_dense():
    torch.manual_seed(0)
    up, down = (
        MXFP4Weight.from_dense(torch.randn(E, H, 2 * I) * 0.1),
        MXFP4Weight.from_dense(torch.randn(E, I, H) * 0.1),
    )
    b1, b2 = torch.randn(E, 2 * I), torch.randn(E, H)
    lora_up = (torch.randn(E, H, 2, requires_grad=True), torch.randn(E, 2, 2 * I, requires_grad=True), 0.5)
    lora_down = (torch.randn(E, I, 2, requires_grad=True), torch.randn(E, 2, H, requires_grad=True), 0.5)
    dense = (up.dequantize(torch.float32), down.dequantize(torch.float32))
    return (up, down), dense, (b1, b2), (lora_up, lora_down)


def moe_grads(n: int, weights, biases, loras, chunk_tokens=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=gen, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)])
    gates = torch.softmax(torch.randn(n, K, generator=gen), -1)
    out = moe.moe_experts(x, ids, gates, weights[0], biases[0], weights[1], biases[1], gate_up_lora=loras[0],
                          down_lora=loras[1], chunk_tokens=chunk_tokens)  # fmt: skip
    params = [x, *loras[0][:2], *loras[1][:2]]
    return out, torch.autograd.grad((out * torch.randn(out.shape, generator=gen)).sum(), params)


@pytest.mark.parametrize("n", [2, 9], ids=["gathered", "loop"])
@pytest.mark.parametrize("mode", ["fast", "deterministic"])
def test_lora_gradients_over_mxfp4_experts_equal_the_dense_reference(n, mode):
    packed, dense, biases, loras = packed_and_dense()
    with deterministic(mode == "deterministic"):
        out, grads = moe_grads(n, packed, biases, loras)
        want_out, want = moe_grads(n, dense, biases, loras)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want, strict=True):
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("mode", ["fast", "deterministic"])
def test_no_dequantized_expert_is_saved_for_the_backward(mode):
    """What autograd keeps over a LoRA forward through MXFP4 experts: no tensor of a dense expert's size (the old
    path kept the whole dequantized layer), whichever path (loop, deterministic)."""
    packed, _, biases, loras = packed_and_dense()
    saved = []
    with (
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
        deterministic(mode == "deterministic"),
    ):
        moe_grads(9, packed, biases, loras)
    floats = [t for t in saved if t.is_floating_point()]
    assert floats and max(t.numel() for t in floats) < H * 2 * I  # one expert's gate_up is H * 2I values


def model_grads(model, tokens: int = 12):
    ids = torch.randint(0, 64, (tokens,), generator=torch.Generator().manual_seed(2))
    logits = model(ids)
    loss = (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))).sum()
    return logits.detach(), torch.autograd.grad(loss, lora_parameters(model))


def test_tiny_gpt_oss_lora_over_mxfp4_experts_equals_dense_and_chunking_changes_nothing():
    model, dense = mxfp4_and_dense(("gate_up_proj", "down_proj"))
    logits, grads = model_grads(model)
    want_logits, want = model_grads(dense)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want, strict=True):
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    for layer in model.model.layers:
        layer.mlp.experts.chunk_tokens = 5  # 12 tokens: chunks of 5, 5, 2
    chunked_logits, chunked = model_grads(model)
    torch.testing.assert_close(chunked_logits, logits, rtol=1e-6, atol=1e-6)
    for got, ref in zip(chunked, grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


# ---- chunked MoE --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed_weights", [True, False], ids=["mxfp4", "dense"])
def test_chunked_moe_equals_unchunked_and_checkpoints_each_chunk(packed_weights, monkeypatch):
    packed, dense, biases, loras = packed_and_dense()
    weights = packed if packed_weights else dense
    out, grads = moe_grads(23, weights, biases, loras)
    calls = []
    checkpoint = moe.checkpoint
    monkeypatch.setattr(moe, "checkpoint", lambda fn, *a, **kw: calls.append(kw) or checkpoint(fn, *a, **kw))
    chunked_out, chunked = moe_grads(23, weights, biases, loras, chunk_tokens=8)
    assert calls == [{"use_reentrant": False}] * 3  # 8 + 8 + 7 tokens
    # fp32: a BLAS call's summation order may change with its row count (here 8 vs 23 rows per chunk)
    torch.testing.assert_close(chunked_out, out, rtol=1e-5, atol=1e-5 * out.abs().max().item())
    for got, ref in zip(chunked, grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    calls.clear()
    with torch.no_grad():  # nothing to recompute: chunks, no checkpoints
        x = torch.randn(23, H)
        ids = torch.randint(0, E, (23, K))
        gates = torch.softmax(torch.randn(23, K), -1)
        args = (weights[0], biases[0], weights[1], biases[1])
        torch.testing.assert_close(moe.moe_experts(x, ids, gates, *args, chunk_tokens=4),
                                   moe.moe_experts(x, ids, gates, *args), rtol=1e-5, atol=1e-4)  # fmt: skip
    assert calls == []


def test_chunked_moe_in_deterministic_mode_is_bitwise_the_unchunked():
    """Batch-invariant MoE: a token's forward numbers do not depend on the tokens beside it, so chunks change no bit
    of the output (backward passes are not batch-invariant: close)."""
    packed, _, biases, loras = packed_and_dense()
    with deterministic():
        out, grads = moe_grads(23, packed, biases, loras)
        chunked_out, chunked = moe_grads(23, packed, biases, loras, chunk_tokens=8)
    assert torch.equal(chunked_out, out)
    for got, ref in zip(chunked, grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_chunk_tokens_is_a_clear_error(bad):
    packed, _, biases, _ = packed_and_dense()
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        moe.moe_experts(torch.randn(3, H), torch.zeros(3, K, dtype=torch.long), torch.ones(3, K), packed[0],
                        biases[0], packed[1], biases[1], chunk_tokens=bad)  # fmt: skip


# ---- must show: peak memory of a LoRA step through MXFP4 experts ---------------------------------------------------
PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from ossrl.model.config import GptOssConfig
    from ossrl.model.gpt_oss import GptOss
    from ossrl.model.lora import LoraConfig, apply_lora, lora_parameters
    from ossrl.model.mxfp4 import MXFP4Weight

    torch.manual_seed(0)
    E, H, I, TOKENS = 32, 1024, 1024, 128
    config = GptOssConfig(vocab_size=256, num_hidden_layers=2, hidden_size=H, intermediate_size=I,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=E,
                          num_experts_per_tok=4, sliding_window=64)
    with torch.device("meta"):  # never a dense expert in this process before the measurement
        model = GptOss(config)
        for layer in model.model.layers:
            for name, (out, fan_in) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
                delattr(layer.mlp.experts, name)
                setattr(layer.mlp.experts, name, MXFP4Weight(torch.empty(E, out, fan_in // 32, 16, dtype=torch.uint8),
                                                             torch.empty(E, out, fan_in // 32, dtype=torch.uint8)))
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in model.model.layers:
            for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                w.blocks.copy_(torch.randint(0, 256, w.blocks.shape, dtype=torch.uint8))
                w.scales.copy_(torch.randint(119, 123, w.scales.shape, dtype=torch.uint8))  # |W| ~ 0.02
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("gate_up_proj", "down_proj")),
               generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    ids = torch.randint(0, 256, (TOKENS,))
    probe = torch.randn(TOKENS, 256)

    def grads():
        loss = (model(ids) * probe).sum()
        return torch.autograd.grad(loss, lora_parameters(model))

    torch.randn(TOKENS, H) @ torch.randn(H, 2 * I)  # warm-up of the thread pool (not the model: that would raise
    # the baseline by whatever a forward dequantizes, hiding it from the measurement)
    saved = {}
    def pack(t):
        if t.is_floating_point():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = grads()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_bytes = sum(n for ptr, n in saved.items() if ptr not in params)
    for layer in model.model.layers:  # the dense reference: the same experts dequantized, frozen
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(layer.mlp.experts, name).dequantize(torch.float32)
            delattr(layer.mlp.experts, name)
            setattr(layer.mlp.experts, name, torch.nn.Parameter(weight, requires_grad=False))
    want = grads()
    error = max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))
    print(json.dumps({"peak_rise_bytes": after - before, "saved_bytes": saved_bytes, "max_grad_rel_error": error,
                      "layer_dense_expert_bytes": E * (H * 2 * I + I * H) * 4}))
""")


def test_lora_step_through_mxfp4_experts_raises_peak_memory_by_well_under_one_dense_layer():
    """The issue's "must show" (CPU): 2 layers, hidden 1024, 32 experts (intermediate 1024, fp32), 128 tokens, LoRA
    r=4 on both expert GEMMs. A fresh process builds the model packed (never dense), so its peak RSS before the
    step is the packed model; the step's rise must stay under half of ONE layer's dense experts (384 MiB in fp32;
    the old path kept both layers' dequantized experts for the backward: 768 MiB), and so must what autograd
    saves. Then the gradients equal the same model's with the experts dequantized."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], cwd=root, capture_output=True, text=True,
                            timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    layer = numbers["layer_dense_expert_bytes"]
    print(f"one layer's dense experts {layer / 2**20:.0f} MiB; LoRA fwd+bwd peak RSS rise "
          f"{numbers['peak_rise_bytes'] / 2**20:.1f} MiB; autograd saved {numbers['saved_bytes'] / 2**20:.1f} MiB; "
          f"max grad rel error vs dense {numbers['max_grad_rel_error']:.2e}")  # fmt: skip
    assert numbers["peak_rise_bytes"] < 0.5 * layer
    assert numbers["saved_bytes"] < 0.5 * layer
    assert numbers["max_grad_rel_error"] < 1e-4


# ---- the real path: a GRPO train step over an MXFP4 checkpoint ------------------------------------------------------
def test_train_step_over_an_mxfp4_checkpoint_trains_expert_lora_without_dequantizing_a_layer(tmp_path, monkeypatch):
    """``Trainer.train_step`` on the tiny model saved as MXFP4 (loaded packed), LoRA on both expert GEMMs: the
    experts stay ``MXFP4Weight``, no whole layer is ever dequantized while autograd records (only decode's
    gathered path dequantizes chosen experts), and the expert adapters train."""
    from ossrl.config import load_config
    from ossrl.model.lora import lora_adapters
    from ossrl.model.tiny import write_tiny_checkpoint
    from ossrl.train.trainer import Trainer

    path = write_tiny_checkpoint(tmp_path / "mxfp4", mxfp4=True)
    trainer = Trainer(load_config(None, [
        f"model.path={path}", "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=2",
        "rollout.max_new_tokens=4", "rollout.max_turns=1", "rollout.kv_cache_tokens=2048", "model.dtype=float32",
        "model.gradient_checkpointing=false", "logging.progress=false", "optim.lr=1e-2",
        "lora.targets=[gate_up_proj, down_proj]", "task.options={system_message: false}",
        f"logging.run_dir={tmp_path / 'run'}",
    ]))  # fmt: skip
    experts = [layer.mlp.experts for layer in trainer.model.model.layers]
    assert all(isinstance(e.gate_up_proj, MXFP4Weight) and isinstance(e.down_proj, MXFP4Weight) for e in experts)
    whole_layer_with_grad = []
    dequantize = MXFP4Weight.dequantize

    def spy(self, dtype=torch.bfloat16, experts=None):
        if experts is None and torch.is_grad_enabled():
            whole_layer_with_grad.append(tuple(self.shape))
        return dequantize(self, dtype, experts)

    monkeypatch.setattr(MXFP4Weight, "dequantize", spy)
    score = trainer.task.score

    def varied(rows, completions, tokenizer=None):  # rewards that differ inside each group: a nonzero advantage
        out = score(rows, completions, tokenizer=tokenizer)
        out.total = [float(i % 2) for i in range(len(out.total))]
        return out

    trainer.task.score = varied
    adapters = [a for a in lora_adapters(trainer.model) if a.lora_B.dim() == 3]  # the per-expert ones
    assert adapters
    before = [a.lora_B.detach().clone() for a in adapters]
    trainer.train_step()
    assert whole_layer_with_grad == []
    assert any(not torch.equal(a.lora_B, b) for a, b in zip(adapters, before, strict=True))
