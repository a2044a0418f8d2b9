"""Our GPT-OSS must give transformers' GptOssForCausalLM logits (eager attention) on the same weights."""

import pytest
import torch
from hf_reference import hf_model_from_ours

from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss

CONFIGS = [
    # (layers, hidden, intermediate, heads, kv heads, head dim, experts, top-k, window, rope scaling)
    dict(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
         head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    dict(num_hidden_layers=4, hidden_size=96, intermediate_size=64, num_attention_heads=8, num_key_value_heads=1,
         head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=5,
         rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                       "original_max_position_embeddings": 64}),
    dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=2,
         head_dim=32, num_local_experts=6, num_experts_per_tok=3, sliding_window=16,
         layer_types=["full_attention", "sliding_attention", "sliding_attention"], rope_scaling=None),
]  # fmt: skip


def random_model(seed: int, **overrides) -> GptOss:
    config = GptOssConfig(vocab_size=257, **overrides)
    model = GptOss.from_config(config, dtype=torch.float32, seed=seed).eval()
    with torch.no_grad():  # larger than the init scale so routing, clamps and sinks all matter
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3 if "sinks" in name or name.endswith("bias") else 0.1)
    return model


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_logits_match_transformers(index, device):
    """On CUDA this goes through the Triton attention kernel (fp32)."""
    torch.manual_seed(index)
    model = random_model(index, **CONFIGS[index])
    hf = hf_model_from_ours(model).to(device)
    model.to(device)
    ids = torch.randint(0, 257, (2, 40), device=device)
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    assert ours.shape == theirs.shape == (2, 40, 257)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_yarn_frequencies_match_transformers():
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from ossrl.model.gpt_oss import rope_frequencies

    config = GptOssConfig(num_hidden_layers=1)  # gpt-oss-20b's rope: theta 150000, yarn factor 32
    inv_freq, concentration = rope_frequencies(config)
    hf_rope = GptOssRotaryEmbedding(HFConfig(**config.to_hf_dict()))
    assert torch.allclose(inv_freq, hf_rope.inv_freq, rtol=1e-6, atol=0)
    assert (
        concentration
        == pytest.approx(hf_rope.attention_scaling)
        == pytest.approx(0.1 * torch.log(torch.tensor(32.0)).item() + 1)
    )
