"""Memory options (``model.offload_activations``, ``model.offload_embeddings``, ``model.moe_chunk_tokens``) through
the real ``Trainer.train_step`` on the tiny model: each changes where memory goes, never the step's numbers.

On CPU there is nothing to move: the hooks and the gather run their no-copy path; the CUDA copies (side stream,
pinned buffers, prefetch) only run on a GPU."""

from __future__ import annotations

import pytest
import torch

from ossrl.config import ConfigError, load_config
from ossrl.kernels import moe as moe_module
from ossrl.model import GptOss
from ossrl.model import gpt_oss as gpt_oss_module
from ossrl.model.lora import LoraConfig, apply_lora
from ossrl.model.offload import ActivationOffload, apply_memory_options, gather_rows
from ossrl.model.tiny import tiny_config
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.train.trainer import Trainer

BASE = [
    "warmup.steps=0", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4", "rollout.max_turns=1",
    "rollout.kv_cache_tokens=2048", "model.dtype=float32", "model.gradient_checkpointing=true",
    "logging.progress=false", "optim.lr=1e-2", "lora.targets=[q_proj, v_proj, gate_up_proj]",
    "task.options={system_message: false}",
]  # fmt: skip
ROLLOUTS: dict = {}
ENGINE_ROLLOUT = Engine.rollout  # the real one (this module's trainers get a cached copy)


@pytest.fixture(scope="module", autouse=True)
def same_rollout():
    """Every trainer here starts from the same weights and seed, so its rollout is the same: sample it once."""
    original = Engine.rollout

    def rollout(self, requests, sampling, tools=None, **kwargs):
        key = (repr(sampling), tuple((tuple(r.prompt_ids), r.n) for r in requests), repr(sorted(kwargs.items())))
        if key not in ROLLOUTS:
            ROLLOUTS[key] = original(self, requests, sampling, tools=tools, **kwargs)
        batch = ROLLOUTS[key]
        return batch.select(range(batch.num_seqs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "rollout", rollout)
        yield


def step(*overrides: str) -> tuple[Trainer, dict[str, float], dict[str, torch.Tensor]]:
    trainer = Trainer(load_config(None, [*BASE, *overrides]))
    trainer.task.score = varied_rewards(trainer.task.score)
    metrics = trainer.train_step()
    # the updated adapters and their (clipped) gradients, which the step leaves in .grad
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    adapters.update({f"{n}.grad": p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    return trainer, metrics, adapters


def varied_rewards(score):
    def scored(rows, completions, tokenizer=None):  # an untrained model scores 0: make the advantages non-zero
        out = score(rows, completions, tokenizer=tokenizer)
        out.total = [float(i % 2) for i in range(len(out.total))]
        return out

    return scored


@pytest.fixture(scope="module")
def reference():
    return step()


def assert_same_step(got, reference, atol: float = 0.0) -> None:
    """Same loss, gradients and updated adapters: bit for bit (atol 0), or, where the option changes a reduction
    order, gradients within atol (then the adapters are not compared: Adam's first step, lr * g / (|g| + eps), turns
    a 1e-9 difference in a near-zero gradient into one of lr)."""
    (_, metrics, adapters), (_, ref_metrics, ref_adapters) = got, reference
    assert metrics["skipped"] == 0.0 and metrics["loss"] != 0.0
    for name in ("loss", "grad_norm", "mismatch/max_abs_diff"):
        assert metrics[name] == pytest.approx(ref_metrics[name], abs=atol, rel=0), name
    assert adapters.keys() == ref_adapters.keys() and adapters
    for name, value in adapters.items():
        if atol == 0 or name.endswith(".grad"):
            torch.testing.assert_close(value, ref_adapters[name], atol=atol, rtol=0, msg=name)


def test_offload_activations_saves_each_layer_input_and_changes_nothing(monkeypatch, reference):
    seen: list[tuple[tuple[int, ...], torch.device]] = []
    original = ActivationOffload._to_host

    def spy(self, tensor):
        host = original(self, tensor)
        seen.append((tuple(tensor.shape), host.device))
        return host

    monkeypatch.setattr(ActivationOffload, "_to_host", spy)
    got = step("model.offload_activations=true")
    trainer = got[0]
    assert_same_step(got, reference)
    offload, layers, hidden = trainer.model.activation_offload, trainer.model.config.num_hidden_layers, 128
    forwards = offload.stats["saved"] // layers
    assert forwards >= 1 and offload.stats["saved"] == forwards * layers  # one input per checkpointed layer
    assert offload.stats["restored"] == offload.stats["saved"]  # each came back once, for its layer's recompute
    assert all(shape[1:] == (hidden,) and device == torch.device("cpu") for shape, device in seen)
    assert len(seen) == offload.stats["saved"]
    assert offload.stats["saved_bytes"] == sum(s[0] * hidden * 4 for s, _ in seen)


def test_offload_hooks_on_the_model_directly_give_bit_equal_gradients():
    torch.manual_seed(0)
    model = GptOss.from_config(tiny_config(vocab_size=64), dtype=torch.float32)
    model.gradient_checkpointing = True
    ids = torch.randint(0, 64, (21,))
    cu = torch.tensor([0, 9, 21], dtype=torch.int32)

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.hidden_states(ids, cu_seqlens=cu).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.activation_offload = ActivationOffload()
    offloaded = grads()
    assert len(plain) == len(offloaded) > 4 * model.config.num_hidden_layers
    for a, b in zip(plain, offloaded, strict=True):
        assert torch.equal(a, b)
    assert model.activation_offload.stats["saved"] == model.config.num_hidden_layers
    assert model.activation_offload.stats["restored"] == model.config.num_hidden_layers
    with torch.no_grad():  # inference (the rollout engine's forwards) saves nothing
        model.hidden_states(ids, cu_seqlens=cu)
    model.gradient_checkpointing = False  # without checkpointing the hooks are not entered at all
    model.hidden_states(ids, cu_seqlens=cu).sum().backward()
    assert model.activation_offload.stats["saved"] == model.config.num_hidden_layers


def test_offload_embeddings_keeps_a_frozen_table_on_the_cpu_and_changes_nothing(monkeypatch, reference, tmp_path):
    gathers: list[torch.device] = []
    original = gpt_oss_module.gather_rows

    def spy(weight, ids):
        gathers.append(weight.device)
        return original(weight, ids)

    monkeypatch.setattr(gpt_oss_module, "gather_rows", spy)
    got = step("model.offload_embeddings=true")
    assert_same_step(got, reference)
    model = got[0].model
    weight = model.model.embed_tokens.weight
    assert model.model.embed_tokens.offloaded and weight.device == torch.device("cpu") and not weight.requires_grad
    assert gathers == [torch.device("cpu")] * len(gathers) and gathers  # the training forwards gathered there
    # the rollout engine runs the same model: its prefill and decode steps gather from the table too, and sample
    # what the same weights sample without the offload
    before = len(gathers)
    request, sampling = [Request([5, 6, 7, 8], n=2)], SamplingParams(max_new_tokens=4, seed=3)
    tokens = ENGINE_ROLLOUT(got[0].engine, request, sampling).tokens
    assert len(gathers) >= before + 4
    assert torch.equal(tokens, ENGINE_ROLLOUT(reference[0].engine, request, sampling).tokens)
    assert model.device == model.model.norm.weight.device  # the model's device is not the table's
    assert "model.embed_tokens.weight" in model.state_dict()  # checkpoints keep the name
    model.save_pretrained(tmp_path)
    loaded = GptOss.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.model.embed_tokens.weight, weight)


def test_gather_rows_equals_the_embedding():
    weight = torch.randn(50, 8)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(gather_rows(weight, ids), torch.nn.functional.embedding(ids, weight))


def test_moe_chunk_tokens_reaches_every_layer_and_changes_nothing_with_both_offloads(monkeypatch, reference):
    chunked: list[int] = []
    original = moe_module._chunked

    def spy(x, expert_ids, expert_weights, args, chunk_tokens):
        chunked.append(chunk_tokens)
        return original(x, expert_ids, expert_weights, args, chunk_tokens)

    monkeypatch.setattr(moe_module, "_chunked", spy)
    got = step("model.moe_chunk_tokens=48", "model.offload_activations=true", "model.offload_embeddings=true")
    assert_same_step(got, reference, atol=1e-6)
    model = got[0].model
    assert all(layer.mlp.experts.chunk_tokens == 48 for layer in model.model.layers)
    assert chunked and set(chunked) == {48}  # the training forward ran its MoE layers in chunks
    stats, layers = model.activation_offload.stats, model.config.num_hidden_layers
    assert stats["saved"] and stats["saved"] % layers == 0  # the MoE chunks' own checkpoints save nothing here


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.offload_activations=true", "model.gradient_checkpointing=false"],
         "model.offload_activations: needs model.gradient_checkpointing=true"),
        (["model.offload_embeddings=true", "lora.enabled=false"], "model.offload_embeddings: needs lora.enabled=true"),
        (["model.offload_embeddings=true", "rollout.cuda_graphs=true"],
         "model.offload_embeddings: cannot run with rollout.cuda_graphs"),
        (["model.offload_embeddings=true", "rollout.torch_compile=true"],
         "model.offload_embeddings: cannot run with rollout.cuda_graphs or rollout.torch_compile"),
        (["model.moe_chunk_tokens=0"], "model.moe_chunk_tokens: must be >= 1"),
        (["model.moe_chunk_tokens=1.5"], "model.moe_chunk_tokens"),
        (["model.offload_activations=1"], "model.offload_activations: expected true/false"),
    ],
)  # fmt: skip
def test_bad_memory_options_fail_validation(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, overrides)


def test_apply_memory_options_refuses_activation_offload_without_checkpointing():
    model = GptOss.from_config(tiny_config(vocab_size=64), dtype=torch.float32)
    settings = load_config(None, []).model
    settings.offload_activations = True
    model.gradient_checkpointing = False
    with pytest.raises(ValueError, match="needs model.gradient_checkpointing"):
        apply_memory_options(model, settings)
    model.gradient_checkpointing = True
    apply_memory_options(model, settings)
    assert isinstance(model.activation_offload, ActivationOffload)
    settings.offload_activations = False
    apply_memory_options(model, settings)
    assert model.activation_offload is None


def test_offload_embeddings_of_a_shape_only_model():
    with torch.device("meta"):  # what ``ossrl memory`` builds
        model = GptOss(tiny_config(vocab_size=64))
    apply_memory_options(model, load_config(None, ["model.offload_embeddings=true"]).model)
    weight = model.model.embed_tokens.weight
    assert weight.device.type == "cpu" and weight.shape == (64, 128) and not weight.requires_grad
    assert model.device.type == "meta"


def test_packed_forward_with_an_offloaded_table_still_matches():
    model = GptOss.from_config(tiny_config(vocab_size=64), dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids)
    settings = load_config(None, ["model.offload_embeddings=true"]).model
    apply_memory_options(model, settings)
    assert model.model.embed_tokens.offloaded and not model.model.embed_tokens.weight.requires_grad
    assert torch.equal(model(ids), before)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the offloads' copies only run on a GPU")


@cuda
def test_cuda_activation_offload_frees_layer_inputs_and_gives_bit_equal_gradients():
    model = GptOss.from_config(tiny_config(vocab_size=64), dtype=torch.float32, device="cuda")
    model.gradient_checkpointing = True
    tokens, layers = 8192, model.config.num_hidden_layers
    ids = torch.randint(0, 64, (tokens,), device="cuda")
    cu = torch.tensor([0, 3000, tokens], dtype=torch.int32, device="cuda")

    def run() -> tuple[list[torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        out = model.hidden_states(ids, cu_seqlens=cu)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - start  # what the forward keeps for the backward
        out.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], held

    plain, held_plain = run()
    model.activation_offload = ActivationOffload()
    offloaded, held_offloaded = run()
    for a, b in zip(plain, offloaded, strict=True):
        assert torch.equal(a, b)
    stats = model.activation_offload.stats
    assert stats["saved"] == stats["restored"] == layers and stats["prefetched"] == layers - 1
    assert held_plain - held_offloaded >= (layers - 1) * tokens * model.config.hidden_size * 4


@cuda
def test_cuda_embedding_table_on_the_cpu_gives_the_same_logits_and_gradients():
    model = GptOss.from_config(tiny_config(vocab_size=64), dtype=torch.float32, device="cuda")
    apply_lora(model, LoraConfig(r=4, targets=("q_proj",)), generator=torch.Generator("cuda").manual_seed(0))
    ids = torch.randint(0, 64, (2, 9), device="cuda")

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    before, grads = run()
    apply_memory_options(model, load_config(None, ["model.offload_embeddings=true"]).model)
    assert model.model.embed_tokens.weight.device.type == "cpu" and model.device.type == "cuda"
    after, offloaded = run()
    assert torch.equal(after, before) and grads
    for a, b in zip(grads, offloaded, strict=True):
        assert torch.equal(a, b)


def test_offload_embeddings_is_refused_under_torchrun():
    """A CPU table inside an FSDP2-wrapped model is untested: a multi-process run refuses it before loading."""
    from types import SimpleNamespace

    config = load_config(None, ["model.offload_embeddings=true"])
    dist = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=2, is_main=True)
    with pytest.raises(ValueError, match="offload_embeddings is not supported under torchrun"):
        Trainer(config, dist=dist)
