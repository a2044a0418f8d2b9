"""The tiny model builder (tests and the CPU demo use it) and the CLI entry point."""

import subprocess
import sys

import torch

from ossrl.cli import main
from ossrl.harmony import HarmonyTokens, Message, load_harmony_tokenizer, render_conversation
from ossrl.model import GptOss, MXFP4Weight


def test_ossrl_help_runs_as_a_console_script():
    result = subprocess.run([sys.executable, "-m", "ossrl.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: ossrl" in result.stdout


def test_tiny_checkpoint_in_both_forms_loads_and_runs(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "dense")]) == 0
    assert main(["tiny", str(tmp_path / "mxfp4"), "--mxfp4"]) == 0
    assert "wrote tiny GPT-OSS" in capsys.readouterr().out
    tokenizer = load_harmony_tokenizer(tmp_path / "dense")
    tokens = HarmonyTokens.from_tokenizer(tokenizer)
    dense = GptOss.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    packed = GptOss.from_pretrained(tmp_path / "mxfp4", dtype=torch.float32)
    assert isinstance(packed.model.layers[0].mlp.experts.gate_up_proj, MXFP4Weight)
    assert dense.config.vocab_size == len(tokenizer)
    assert set(dense.config.eos_token_id) == {tokens.return_, tokens.call}
    layer_types = dense.config.layer_types
    assert "sliding_attention" in layer_types and "full_attention" in layer_types
    ids = render_conversation([Message.user("What is 2 + 3?")], tokenizer, reasoning_effort="low")
    with torch.no_grad():
        a, b = dense(torch.tensor([ids])), packed(torch.tensor([ids]))
    assert a.shape == (1, len(ids), len(tokenizer))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # Same seed, experts quantized to 4 bits: the logits move (random weights: RMS change ~0.3 of their spread, some
    # logits by 0.5) but stay close; exact MXFP4 decoding is tested against transformers in test_checkpoint.py.
    assert (a - b).pow(2).mean().sqrt() < 0.5 * a.std()
