"""Checkpoint io in both forms gpt-oss ships (bf16, MXFP4 experts), MXFP4 numerics, and bad checkpoints."""

import copy
import json

import pytest
import torch
from hf_reference import hf_model_from_ours
from safetensors.torch import load_file, save_file
from test_model_parity import random_model

from ossrl.model.checkpoint import quantize_experts
from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss
from ossrl.model.mxfp4 import FP4_VALUES, MXFP4Weight, dequantize_mxfp4, quantize_mxfp4

SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return random_model(3, **SMALL)


def logits_close(a: GptOss, b, ids, atol=1e-4):
    with torch.no_grad():
        ours = a(ids)
        theirs = b(input_ids=ids).logits if not isinstance(b, GptOss) else b(ids)
    assert (ours - theirs).abs().max().item() <= atol


def test_mxfp4_decodes_low_nibble_first_with_e8m0_scales():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2F  # low nibble 0xF = -6.0, high nibble 0x2 = 1.0
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2**(128-127) = 2
    dense = dequantize_mxfp4(blocks, scales, torch.float32)
    assert dense.shape == (1, 32)
    assert dense[0, :2].tolist() == [-12.0, 2.0]
    assert dense[0, 2:].abs().sum() == 0


def test_mxfp4_dequantizes_every_byte_at_every_scale_exactly():
    from ossrl.model.mxfp4 import FP4_VALUES

    byte = torch.arange(256, dtype=torch.uint8)
    blocks = byte.view(16, 1, 16).repeat(256, 1, 1, 1)  # per scale: 16 rows of one block, all 256 bytes
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1, 1).expand(256, 16, 1).contiguous()
    dense = dequantize_mxfp4(blocks, scales, torch.float32).view(256, 256, 2)  # [scale, byte, nibble]
    table = torch.tensor(FP4_VALUES)
    want = torch.stack((table[byte.long() & 15], table[byte.long() >> 4]), -1)
    want = torch.ldexp(want.unsqueeze(0), torch.arange(-127.0, 129.0).view(256, 1, 1))
    exact = dict(rtol=0, atol=0, equal_nan=True)  # scale 255 (NaN in E8M0) gives inf, and 0 * inf = NaN
    torch.testing.assert_close(dense, want, **exact)
    bf16 = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    torch.testing.assert_close(bf16, want.to(torch.bfloat16).view(256, 16, 32), **exact)


def test_mxfp4_matches_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8)
    scales = torch.randint(118, 136, (3, 8, 2), dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    ours = MXFP4Weight(blocks, scales).dequantize(torch.float32)
    assert ours.shape == theirs.shape == (3, 64, 8)
    assert torch.equal(ours, theirs)


def test_mxfp4_quantization_is_exact_on_the_grid_and_close_elsewhere():
    grid = torch.tensor(FP4_VALUES).repeat(2, 2)[:, :32] * 2.0**-3  # representable values
    blocks, scales = quantize_mxfp4(grid)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), grid)
    w = torch.randn(4, 16, 64)
    restored = dequantize_mxfp4(*quantize_mxfp4(w), torch.float32)
    rel = (restored - w).norm() / w.norm()
    assert 0 < rel < 0.2
    assert quantize_mxfp4(torch.zeros(1, 32))[1].item() == 0  # an all-zero block gets the smallest scale


@pytest.mark.parametrize("max_shard_bytes", [2**40, 40_000])
def test_bf16_checkpoint_round_trip_and_transformers_loads_it(model, tmp_path, max_shard_bytes):
    bf16 = random_model(3, **SMALL).set_dtype(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())  # same values, rounded to bf16
    path = bf16.save_pretrained(tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    sharded = (path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 2**40)
    loaded = GptOss.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 257, (2, 24))
    logits_close(loaded, hf_model_from_ours(loaded), ids)
    from transformers import GptOssForCausalLM

    hf = GptOssForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    logits_close(loaded, hf, ids)


def test_mxfp4_checkpoint_keeps_experts_packed_and_matches_dequantized_reference(model, tmp_path):
    path = model.save_pretrained(tmp_path / "mxfp4", mxfp4=True)
    stored = load_file(path / "model.safetensors")
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 64, 2, 16)
    assert stored["model.layers.0.mlp.experts.down_proj_scales"].shape == (4, 64, 1)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in stored
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"

    packed = GptOss.from_pretrained(path, dtype=torch.float32)
    experts = packed.model.layers[1].mlp.experts
    assert isinstance(experts.gate_up_proj, MXFP4Weight) and experts.gate_up_proj.blocks.dtype == torch.uint8
    expected = dequantize_mxfp4(*quantize_mxfp4(model.model.layers[1].mlp.experts.down_proj.detach().transpose(1, 2)))
    assert torch.equal(experts.down_proj.dequantize(torch.float32), expected.float().transpose(1, 2))
    ids = torch.randint(0, 257, (2, 24))
    logits_close(packed, hf_model_from_ours(packed), ids)  # the reference gets the dequantized weights
    dense = GptOss.from_pretrained(path, dtype=torch.float32, keep_mxfp4=False)
    assert isinstance(dense.model.layers[1].mlp.experts.down_proj, torch.nn.Parameter)
    logits_close(packed, dense, ids, atol=1e-5)
    again = packed.save_pretrained(tmp_path / "again", mxfp4=True)  # packed weights are written back bit-exactly
    assert torch.equal(load_file(again / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                       stored["model.layers.0.mlp.experts.gate_up_proj_blocks"])  # fmt: skip
    in_memory = quantize_experts(copy.deepcopy(model))
    assert isinstance(in_memory.model.layers[0].mlp.experts.gate_up_proj, MXFP4Weight)
    assert not any(name.endswith("experts.down_proj") for name, _ in in_memory.named_parameters())
    assert torch.equal(in_memory(ids), packed(ids))  # packing in memory = loading the MXFP4 checkpoint


def test_from_config_builds_on_meta_first_without_fp32_copies():
    config = GptOssConfig(vocab_size=100, **SMALL)
    model = GptOss.from_config(config, dtype=torch.bfloat16, seed=1)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["model.layers.0.mlp.experts.gate_up_proj"] == torch.bfloat16
    assert dtypes["model.layers.0.self_attn.sinks"] == torch.float32
    assert dtypes["model.norm.weight"] == torch.float32
    again = GptOss.from_config(config, dtype=torch.bfloat16, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    assert model(torch.randint(0, 100, (1, 5))).dtype == torch.bfloat16


def test_bad_checkpoints_are_clear_errors(model, tmp_path):
    path = model.save_pretrained(tmp_path / "ok", max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]

    (path / shard).rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=shard):
        GptOss.from_pretrained(path)
    (tmp_path / "moved").rename(path / shard)

    tensors = load_file(path / shard)
    name = sorted(tensors)[0]
    save_file({**tensors, name: torch.zeros(3, 3)}, path / shard)
    with pytest.raises(ValueError, match=f"{name} has shape"):
        GptOss.from_pretrained(path)

    del tensors[name]
    save_file({**tensors, "model.layers.9.extra": torch.zeros(1)}, path / shard)
    index["weight_map"]["model.layers.9.extra"] = shard
    del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing 1 tensors: " + name.replace(".", r"\.")):
        GptOss.from_pretrained(path)

    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        GptOss.from_pretrained(tmp_path / "nowhere")


def test_bad_configs_are_clear_errors(tmp_path):
    good = GptOssConfig(vocab_size=100, **SMALL).to_hf_dict()
    for change, message in [
        ({"hidden_sizee": 64}, "unknown config fields \\['hidden_sizee'\\]"),
        ({"num_attention_heads": 3}, "multiple of num_key_value_heads"),
        ({"layer_types": ["sliding_attention"]}, "one entry per layer"),
        ({"layer_types": ["full_attention", "chunked"]}, "unknown layer types"),
        ({"num_experts_per_tok": 9}, "cannot exceed num_local_experts"),
        ({"model_type": "llama"}, "expected 'gpt_oss'"),
        ({"rope_scaling": {"rope_type": "longrope"}}, "rope_type"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=message) as info:
            GptOssConfig.from_json(tmp_path / "config.json")
        assert str(tmp_path / "config.json") in str(info.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GptOssConfig.from_json(tmp_path / "config.json")


def test_released_gpt_oss_20b_config_parses():
    released = {  # https://huggingface.co/openai/gpt-oss-20b config.json (MXFP4 release)
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    }  # fmt: skip
    config = GptOssConfig.from_dict(released)
    assert config == GptOssConfig(eos_token_id=200002, pad_token_id=199999)  # our defaults are gpt-oss-20b
    assert 20.8e9 < config.num_params < 21.0e9
