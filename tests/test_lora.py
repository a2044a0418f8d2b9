"""LoRA: zero-init is a no-op, only adapters train, disabled_lora is the base model, expert LoRA equals a dense
per-expert reference (also over MXFP4 experts), PEFT loads what we save and we load what PEFT saves (same logits
as transformers' GptOssForCausalLM), the rollout engine runs the adapters, and bad input fails clearly."""

import copy
import json

import pytest
import torch
from hf_reference import hf_model_from_ours
from test_model_parity import random_model

from ossrl.kernels.moe import swiglu_clamped
from ossrl.model.lora import (
    ALL_TARGETS,
    ATTENTION_TARGETS,
    ExpertLoraAdapter,
    LoraConfig,
    apply_lora,
    disabled_lora,
    load_peft_adapter,
    load_peft_state_dict,
    lora_parameters,
    peft_state_dict,
    save_peft_adapter,
)
from ossrl.model.mxfp4 import MXFP4Weight

SHAPES = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6)  # fmt: skip
EXPERTS_AND_ROUTER = ("gate_up_proj", "down_proj", "router")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine thread spin-waits cost 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_model(seed=0, **overrides):
    torch.manual_seed(seed)  # random_model draws from the global generator
    return random_model(seed, **{**SHAPES, **overrides})


def model_with_lora(targets=ALL_TARGETS, r=3, seed=0, **kwargs):
    """A random tiny model with adapters whose B is non-zero (so they change the output)."""
    model = base_model(seed)
    apply_lora(model, LoraConfig(r=r, alpha=2 * r, targets=targets, **kwargs))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return model


def ids(seed=0, shape=(2, 19)):
    return torch.randint(0, 257, shape, generator=torch.Generator().manual_seed(seed))


def test_zero_init_adapters_leave_logits_unchanged_and_freeze_the_base():
    model = base_model()
    with torch.no_grad():
        base = model(ids())
    apply_lora(model, LoraConfig(r=4, targets=ALL_TARGETS))
    with torch.no_grad():
        assert torch.equal(model(ids()), base)
    lora = {id(p) for p in lora_parameters(model)}
    assert len(lora) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in lora), name
        if name.endswith("lora_B"):
            assert not p.any(), name
        elif name.endswith("lora_A"):  # PEFT's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            fan_in = p.shape[1]
            assert p.abs().max() <= fan_in**-0.5 and p.std() > 0.3 * fan_in**-0.5, name
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_lora.lora_A.shape == (4, 64, 4) and experts.down_lora.lora_B.shape == (4, 4, 64)


def test_gradients_reach_only_the_adapters():
    model = model_with_lora()
    model(ids()).square().mean().backward()
    lora = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_disabled_lora_gives_the_base_logits_and_restores_the_adapters():
    model = base_model()
    with torch.no_grad():
        base = model(ids())
    model = model_with_lora()
    with torch.no_grad():
        adapted = model(ids())
        assert (adapted - base).abs().max() > 1e-2
        with disabled_lora(model):
            assert torch.equal(model(ids()), base)
            with disabled_lora(model):  # nesting keeps the outer block's state
                pass
            assert torch.equal(model(ids()), base)
        assert torch.equal(model(ids()), adapted)
        with pytest.raises(RuntimeError), disabled_lora(model):
            raise RuntimeError("boom")
        assert torch.equal(model(ids()), adapted)


@pytest.mark.parametrize("targets", [("gate_up_proj", "down_proj"), ("gate_up_proj",), ("down_proj",)])
def test_expert_lora_equals_a_dense_per_expert_reference(targets):
    model = model_with_lora(targets, r=3)
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(23, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with torch.no_grad():
        expert_ids, weights = model.model.layers[1].mlp.router(x)
    out = experts(x, expert_ids, weights)

    def weight(name):  # W_e + scale * A_e @ B_e, formed densely (what a merge would give)
        w, lora = getattr(experts, f"{name}_proj"), getattr(experts, f"{name}_lora")
        return w if lora is None else w + lora.scale * lora.lora_A @ lora.lora_B

    w1, w2 = weight("gate_up"), weight("down")
    ref = torch.zeros_like(out)
    for n in range(x.shape[0]):
        for slot in range(expert_ids.shape[1]):
            e = expert_ids[n, slot]
            h = swiglu_clamped(x[n] @ w1[e] + experts.gate_up_proj_bias[e], experts.alpha, experts.limit)
            ref[n] += weights[n, slot] * (h @ w2[e] + experts.down_proj_bias[e])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    params = lora_parameters(experts)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *params])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def to_mxfp4(model):
    for layer in model.model.layers:
        for name in ("gate_up_proj", "down_proj"):
            dense = getattr(layer.mlp.experts, name).detach()
            delattr(layer.mlp.experts, name)
            setattr(layer.mlp.experts, name, MXFP4Weight.from_dense(dense))
    return model


def test_expert_lora_works_over_mxfp4_experts():
    packed = to_mxfp4(base_model())
    dense = copy.deepcopy(packed)
    for layer in dense.model.layers:  # the same (quantized) values, held dense
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(layer.mlp.experts, name).dequantize(torch.float32)
            delattr(layer.mlp.experts, name)
            setattr(layer.mlp.experts, name, torch.nn.Parameter(weight))
    apply_lora(packed, LoraConfig(r=4, targets=ALL_TARGETS))
    apply_lora(dense, LoraConfig(r=4, targets=ALL_TARGETS))
    with torch.no_grad():
        for p in lora_parameters(packed):
            p.normal_(0, 0.2)
    load_peft_state_dict(dense, peft_state_dict(packed))
    out = packed(ids())
    torch.testing.assert_close(out, dense(ids()), atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(packed))
    assert isinstance(packed.model.layers[0].mlp.experts.gate_up_proj, MXFP4Weight)  # still packed, not trained


@pytest.mark.parametrize("targets", [ATTENTION_TARGETS, ALL_TARGETS, ("q_proj", "v_proj", "down_proj", "router")])
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, targets):
    from peft import PeftModel

    model = base_model()
    hf = hf_model_from_ours(model)  # the base weights, before adapters are attached
    apply_lora(model, LoraConfig(r=3, alpha=6, targets=targets))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
    save_peft_adapter(model, tmp_path, base_model_name_or_path="tiny")
    peft_model = PeftModel.from_pretrained(hf, tmp_path)
    with torch.no_grad():
        ours, theirs = model(ids()), peft_model(input_ids=ids()).logits
        with disabled_lora(model):
            base = model(ids())
    assert (ours - base).abs().max() > 1e-2  # the adapter matters ...
    assert (ours - theirs).abs().max() <= 1e-4  # ... and PEFT applies it as we do
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"


def test_we_load_an_adapter_peft_saved(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = base_model()
    hf = hf_model_from_ours(model)
    peft_config = PeftLoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj"], init_lora_weights=False,
                                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                    "mlp.router.weight"])  # fmt: skip
    peft_model = get_peft_model(hf, peft_config)  # init_lora_weights=False: B is random too
    peft_model.save_pretrained(tmp_path)
    load_peft_adapter(model, tmp_path)
    assert model.lora_config == LoraConfig(r=2, alpha=5, targets=("k_proj", "o_proj", *EXPERTS_AND_ROUTER))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids()).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids()).logits
        ours = model(ids())
    assert (theirs - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-4


def test_save_load_round_trip(tmp_path):
    model = model_with_lora(ALL_TARGETS, r=5)
    path = save_peft_adapter(model, tmp_path / "adapter")
    fresh = load_peft_adapter(base_model(), path)  # attaches adapters from adapter_config.json
    assert fresh.lora_config == model.lora_config
    for a, b in zip(lora_parameters(model), lora_parameters(fresh), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(ids()), fresh(ids()))
    again = model_with_lora(ALL_TARGETS, r=5, seed=0)  # already has matching adapters: overwritten in place
    with torch.no_grad():
        for p in lora_parameters(again):
            p.zero_()
    load_peft_adapter(again, path)
    with torch.no_grad():
        assert torch.equal(again(ids()), model(ids()))
    assert isinstance(again.model.layers[0].mlp.experts.down_lora, ExpertLoraAdapter)


def test_engine_generates_with_unmerged_adapters():
    from ossrl.rollout import Engine, Request, SamplingParams

    model = model_with_lora(ALL_TARGETS).eval()
    prompt = ids(3, (9,)).tolist()
    sampling = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[])
    (completion,) = Engine(model).generate([Request(prompt)], sampling)[0]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
        logprobs = torch.log_softmax(model(torch.tensor([tokens]))[0, len(prompt) - 1 : -1], -1)
    assert completion.token_ids == tokens[len(prompt) :]
    expected = logprobs.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
    assert (torch.tensor(completion.logprobs) - expected).abs().max() < 1e-4


def test_dropout_acts_only_in_training_with_gradients():
    model = model_with_lora(ATTENTION_TARGETS, dropout=0.5)
    with torch.no_grad():
        eval_out = model.eval()(ids())
        assert torch.equal(model.train()(ids()), eval_out)  # no gradients: no dropout (rollouts, old log-probs)
    assert not torch.equal(model(ids()), eval_out)


def test_bad_input_is_a_clear_error(tmp_path):
    for bad, match in [(dict(r=0), "lora.r"), (dict(alpha=0), "lora.alpha"), (dict(dropout=1.0), "lora.dropout"),
                       (dict(targets=("q_proj", "mlp")), "lora.targets"), (dict(targets=()), "lora.targets"),
                       (dict(targets=("down_proj",), dropout=0.1), "ParamWrapper")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            LoraConfig(**bad)
    model = model_with_lora(ALL_TARGETS, r=3)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(base_model(), tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(base_model(), tmp_path / "missing")
    path = save_peft_adapter(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="r=3.*r=4"):  # the model's adapters do not match the file's
        load_peft_adapter(model_with_lora(ALL_TARGETS, r=4), path)
    with pytest.raises(ValueError, match="expected"):  # another model size: shapes differ, the tensor is named
        load_peft_adapter(base_model(hidden_size=96), path)
    with pytest.raises(ValueError, match="missing 14 LoRA tensors"):  # one layer fewer in the file than the model
        load_peft_adapter(base_model(num_hidden_layers=3), path)
    config = json.loads((path / "adapter_config.json").read_text())
    for key, value in [("use_dora", True), ("use_rslora", True), ("peft_type", "IA3"), ("target_modules", ".*q")]:
        (path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=key if key != "target_modules" else "regex"):
            load_peft_adapter(base_model(), path)


def test_base_checkpoint_excludes_adapters(tmp_path):
    from ossrl.model import GptOss
    from ossrl.model.lora import LoraConfig, apply_lora
    from ossrl.model.tiny import tiny_config

    model = GptOss.from_config(tiny_config(100, num_hidden_layers=2), dtype=torch.float32)
    apply_lora(model, LoraConfig(r=4, targets=("q_proj", "gate_up_proj", "router")))
    reloaded = GptOss.from_pretrained(model.save_pretrained(tmp_path / "base"), dtype=torch.float32)  # strict load
    assert not any("lora" in name for name, _ in reloaded.named_parameters())


def test_adapters_are_fp32_in_a_bf16_model_so_small_adam_steps_are_not_lost():
    model = base_model().set_dtype(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, targets=ALL_TARGETS))
    params = lora_parameters(model)
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for p in params[1::2]:  # B: non-zero, so every A gets a gradient
            p.normal_(0, 0.2)
    logits = model(ids())
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    a_factors = params[0::2]
    before = [a.detach().clone() for a in a_factors]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    optimizer.step()
    for a, old in zip(a_factors, before, strict=True):
        assert (a != old).float().mean() > 0.9  # Adam moves (almost) every entry by ~lr ...
        assert (a.bfloat16() == old.bfloat16()).float().mean() > 0.9  # ... which bf16 adapters would have lost
    states = [t for p in params for t in optimizer.state[p].values() if t.dim()]  # exp_avg, exp_avg_sq
    assert len(states) == 2 * len(params) and all(t.dtype == torch.float32 for t in states)


def test_an_adapter_saved_in_bf16_loads_into_fp32_adapters(tmp_path):
    from safetensors.torch import load_file, save_file

    model = model_with_lora(ALL_TARGETS)
    path = save_peft_adapter(model, tmp_path / "adapter")
    weights = path / "adapter_model.safetensors"
    assert all(t.dtype == torch.float32 for t in load_file(weights).values())  # we save what we train
    save_file({name: t.bfloat16() for name, t in load_file(weights).items()}, weights)  # as PEFT saves a bf16 run
    fresh = load_peft_adapter(base_model().set_dtype(torch.bfloat16), path)
    for ours, loaded in zip(lora_parameters(model), lora_parameters(fresh), strict=True):
        assert loaded.dtype == torch.float32 and torch.equal(loaded, ours.bfloat16().float())
