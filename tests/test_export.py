"""ossrl export: a LoRA adapter merged into its base gives an HF checkpoint that transformers loads with the same
logits as our model running the adapter unmerged (dense, and MXFP4 within its rounding), over dense and MXFP4
bases; shards are bounded and indexed; the command line works; bad input fails before anything is written."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ossrl.cli import main
from ossrl.model import GptOss, MXFP4Weight
from ossrl.model.checkpoint import INDEX_FILE, MXFP4_QUANTIZATION_CONFIG
from ossrl.model.export import export_checkpoint, parse_size
from ossrl.model.lora import (
    ALL_TARGETS,
    ATTENTION_TARGETS,
    LoraConfig,
    apply_lora,
    disabled_lora,
    load_peft_adapter,
    lora_parameters,
    save_peft_adapter,
)
from ossrl.model.tiny import write_tiny_checkpoint

VOCAB = 1263  # the tiny tokenizer's


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def base(work):
    path = write_tiny_checkpoint(work / "base")  # fp32, 4 layers, 8 experts, tokenizer + chat template
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8], "do_sample": True}))
    return path


def with_random_lora(model, targets=ALL_TARGETS, seed=0):
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):  # B non-zero: the merge matters
            p.normal_(0, 0.1, generator=generator)
    return model


@pytest.fixture(scope="module")
def adapted(base, work):
    """Our model running the adapter unmerged, and the adapter's directory."""
    model = with_random_lora(GptOss.from_pretrained(base, dtype=torch.float32)).eval()
    return model, save_peft_adapter(model, work / "adapter")


@pytest.fixture(scope="module")
def merged(base, adapted, work):
    return export_checkpoint(base, work / "merged", adapter=adapted[1])


def ids(seed=0, shape=(3, 48)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def hf_model(path, **kwargs):
    from transformers import GptOssForCausalLM

    return GptOssForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager",
                                             **kwargs).eval()  # fmt: skip


def hf_mxfp4_model(path):
    from transformers import Mxfp4Config

    return hf_model(path, quantization_config=Mxfp4Config(dequantize=True))  # as the release loads on a CPU


def max_diff(ours, other, tokens):
    """Largest logit difference between our model and transformers' (or another of ours)."""
    with torch.no_grad():
        theirs = other(tokens) if isinstance(other, GptOss) else other(input_ids=tokens).logits
        return (ours(tokens) - theirs).abs().max().item()


def stored(path):
    """Every tensor of an exported checkpoint, by name (through its index)."""
    files = set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values())
    return {name: t for f in files for name, t in load_file(path / f).items()}


def test_merged_export_loads_in_transformers_with_the_adapters_logits(base, adapted, merged):
    model, _ = adapted
    path = merged.path
    hf = hf_model(path)
    with torch.no_grad(), disabled_lora(model):
        base_logits = model(ids())
    with torch.no_grad():
        assert (model(ids()) - base_logits).abs().max() > 0.1  # the adapter matters ...
    for seed in range(3):
        assert max_diff(model, hf, ids(seed)) <= 1e-4  # ... and the export carries it
    assert max_diff(model, GptOss.from_pretrained(path, dtype=torch.float32), ids()) <= 1e-4

    assert set(stored(path)) == {name for name, _ in hf.named_parameters()}  # transformers' names, nothing else
    assert len(merged.merged) == 7 * 4 and merged.shards == ["model-00001-of-00001.safetensors"]
    assert merged.rounding_error < 1e-5  # fp32: the exact merge
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "quantization_config" not in config  # the base's dtype
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (path / name).read_bytes() == (base / name).read_bytes(), name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).chat_template == AutoTokenizer.from_pretrained(base).chat_template


def test_mxfp4_export_matches_ours_on_it_and_stays_within_rounding_of_the_merge(base, adapted, merged, work):
    result = export_checkpoint(base, work / "mxfp4", adapter=adapted[1], mxfp4=True)
    path = result.path
    tensors = stored(path)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (8, 256, 4, 16)
    assert tensors["model.layers.3.mlp.experts.down_proj_scales"].shape == (8, 128, 4)
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in tensors)
    assert json.loads((path / "config.json").read_text())["quantization_config"] == MXFP4_QUANTIZATION_CONFIG

    ours = GptOss.from_pretrained(path, dtype=torch.float32)
    assert isinstance(ours.model.layers[0].mlp.experts.down_proj, MXFP4Weight)
    hf = hf_mxfp4_model(path)
    for seed in range(3):
        assert max_diff(ours, hf, ids(seed)) <= 1e-4

    exact = GptOss.from_pretrained(merged.path, dtype=torch.float32)  # the unquantized merge
    quantized = dict(ours.named_parameters()) | {n: m.dequantize(torch.float32) for n, m in ours.named_modules()
                                                 if isinstance(m, MXFP4Weight)}  # fmt: skip
    for name, want in exact.named_parameters():
        got = quantized[name]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert 0 < ((got - want).norm() / want.norm()).item() < 0.15, name  # MXFP4's rounding, no more
        else:
            assert torch.equal(got, want), name
    assert 0 < result.rounding_error < 1  # this adapter's update is larger than the rounding

    again = export_checkpoint(path, work / "mxfp4_again", mxfp4=True)  # no adapter: experts copied bit for bit
    assert all(torch.equal(t, stored(again.path)[name]) for name, t in tensors.items())


def test_adapter_over_an_mxfp4_base(base, adapted, work):
    packed = export_checkpoint(base, work / "packed_base", mxfp4=True).path  # an MXFP4 base, as released
    model = load_peft_adapter(GptOss.from_pretrained(packed, dtype=torch.float32), adapted[1]).eval()
    dense = export_checkpoint(packed, work / "packed_merged", adapter=adapted[1]).path
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    hf = hf_model(dense)
    for seed in range(2):
        assert max_diff(model, hf, ids(seed)) <= 1e-4

    attention = with_random_lora(GptOss.from_pretrained(packed, dtype=torch.float32), ATTENTION_TARGETS, seed=1)
    adapter = save_peft_adapter(attention.eval(), work / "attention_adapter")
    out = export_checkpoint(packed, work / "packed_attention", adapter=adapter, mxfp4=True).path
    before, after = stored(packed), stored(out)
    assert all(torch.equal(after[n], t) for n, t in before.items() if n.endswith(("_blocks", "_scales")))
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert max_diff(attention, hf_mxfp4_model(out), ids()) <= 1e-4


def test_an_update_below_the_output_precision_is_reported(base, adapted, work, caplog):
    small = shutil.copytree(adapted[1], work / "small_adapter")
    tensors = load_file(small / "adapter_model.safetensors")
    save_file({n: t * 1e-4 if "lora_B" in n else t for n, t in tensors.items()}, small / "adapter_model.safetensors")
    assert export_checkpoint(base, work / "small_fp32", adapter=small).rounding_error < 1e-3
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # (INFO progress lines may be on)
    with caplog.at_level("WARNING", logger="ossrl.model.export"):
        result = export_checkpoint(base, work / "small_bf16", adapter=small, dtype="bfloat16")
    assert result.rounding_error > 1
    assert "bfloat16 moves the merged weights" in caplog.text and "--dtype float32 keeps it" in caplog.text


def test_shards_are_bounded_and_indexed(base, adapted, merged, work):
    limit = 300_000
    result = export_checkpoint(base, work / "sharded", adapter=adapted[1], max_shard_size=limit)
    path = result.path
    index = json.loads((path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == result.shards and len(files) >= 10
    assert sorted(p.name for p in path.glob("*.safetensors")) == files
    total = 0
    for file in files:
        with safe_open(path / file, framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
            sizes = [f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names]
        assert all(index["weight_map"][n] == file for n in names)
        assert sum(sizes) <= limit or len(names) == 1  # a tensor larger than the limit gets a shard of its own
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total == result.total_bytes == merged.total_bytes
    assert len(index["weight_map"]) == len(stored(merged.path))
    sharded, single = (GptOss.from_pretrained(p, dtype=torch.float32) for p in (path, merged.path))
    assert all(torch.equal(a, b) for a, b in zip(sharded.parameters(), single.parameters(), strict=True))
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(1000) == 1000


def test_command_line(base, adapted, work, capsys):
    model, adapter = adapted
    out = work / "cli"
    args = ["export", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "bfloat16",
            "--max-shard-size", "2MB", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    tensors = stored(out)
    assert len(json.loads((out / INDEX_FILE).read_text())["weight_map"]) == len(tensors)
    assert len(set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values())) > 1
    for name, t in tensors.items():  # norms and sinks stay fp32, as released; the rest is bf16
        want = torch.float32 if name.endswith(("sinks", "norm.weight")) else torch.bfloat16
        assert t.dtype == want, name
    q = model.model.layers[1].self_attn.q_proj
    want = (q.weight + q.lora.scale * q.lora.lora_B @ q.lora.lora_A).to(torch.bfloat16)  # merged in fp32, cast once
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.weight"], want)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    assert main(args) == 2  # refuses to write into a non-empty directory
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    again = work / "cli_again"
    assert main(["export", "--model", str(out), "--out", str(again)]) == 0  # default dtype: the base's (bf16)
    assert all(torch.equal(t, stored(again)[n]) for n, t in tensors.items())
    assert main(["export", "--model", str(base), "--out", str(work / "x"), "--dtype", "float8"]) == 2
    assert "dtype must be one of ['bfloat16', 'float16', 'float32']" in capsys.readouterr().err


def test_bad_input_is_a_clear_error_before_anything_is_written(base, adapted, merged, work):
    _, adapter = adapted
    out = work / "never"
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_checkpoint(base, out, dtype="float8")
    with pytest.raises(ValueError, match="max shard size"):
        export_checkpoint(base, out, max_shard_size="lots")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        export_checkpoint(work / "nowhere", out)
    with pytest.raises(ValueError, match="is an input"):
        export_checkpoint(base, base)
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(base, merged.path)

    bad = work / "bad_adapter"
    shutil.copytree(adapter, bad)
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        export_checkpoint(base, out, adapter=bad)
    tensors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "other/model"}))
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    for change, match in [
        ({name: torch.zeros(4, 96)}, f"{name} has shape \\[4, 96\\], expected \\[4, 128\\] for the base's "
                                     "model.layers.1.self_attn.q_proj.weight .* names its base: other/model"),
        ({name.replace("layers.1", "layers.4"): tensors[name].clone()}, "unexpected 1 .*layers.4.self_attn"),
    ]:  # fmt: skip
        save_file({**tensors, **change}, bad / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=match):
            export_checkpoint(base, out, adapter=bad)
    save_file({n: t for n, t in tensors.items() if n != name}, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing 1 LoRA tensors \\['{name}'\\]"):
        export_checkpoint(base, out, adapter=bad)

    broken = work / "broken_base"
    shutil.copytree(base, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({**weights, "model.norm.weight": torch.ones(3)}, broken / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight has shape \\[3\\], expected \\[128\\]"):
        export_checkpoint(broken, out)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        export_checkpoint(broken, out)
    assert not out.exists()
