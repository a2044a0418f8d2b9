"""`ossrl eval` end to end on the tiny model (accuracy ~0 with random weights; it must run and report)."""

import json
from pathlib import Path

import pytest

from ossrl.cli import main
from ossrl.model.tiny import write_tiny_checkpoint

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.mark.skipif(not GSM8K.exists(), reason="needs ../shared/data/gsm8k/train.jsonl")
def test_eval_gsm8k_runs_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_dir), "--task", "gsm8k", "--option", f"path={GSM8K}",
            "--option", "eval_size=6", "--limit", "3", "--max-new-tokens", "16", "--dtype", "float32",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == 3 and result["task"] == "gsm8k" and 0.0 <= result["accuracy"] <= 1.0
    assert set(result["rewards"]) == {"correct", "format"}
    assert sum(result["finish_reasons"].values()) == 3
    assert json.loads(capsys.readouterr().out)["rows"] == 3


def test_eval_with_a_tool_task(tiny_dir, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_dir), "--task", "arithmetic", "--limit", "2", "--max-new-tokens", "8",
            "--dtype", "float32", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(out.read_text())["rows"] == 2


def test_eval_bad_task_is_a_clear_error(tiny_dir, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--task", "gsm9k"]) == 2
    assert "gsm8k" in capsys.readouterr().err  # the error names the closest task


def test_eval_with_a_lora_adapter(tiny_dir, tmp_path):
    import torch

    from ossrl.model import GptOss
    from ossrl.model.lora import LoraConfig, apply_lora, save_peft_adapter

    model = GptOss.from_pretrained(tiny_dir, dtype=torch.float32)
    apply_lora(model, LoraConfig(r=4))
    save_peft_adapter(model, tmp_path / "adapter")
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--task", "arithmetic",
            "--limit", "2", "--max-new-tokens", "8", "--dtype", "float32", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(out.read_text())["rows"] == 2
    assert main([*argv[:3], "--adapter", str(tmp_path / "nowhere"), *argv[5:]]) == 2
