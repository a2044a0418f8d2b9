import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
if not torch.cuda.is_available():  # Triton kernels run in its interpreter; set before ANY test imports Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (torch.compile does), whatever order the tests run in


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer): the tiny fp32 checkpoint with matrices scaled up 6x, so sampled text is not uniform."""
    from ossrl.harmony import load_harmony_tokenizer
    from ossrl.model import GptOss
    from ossrl.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", sliding_window=8)
    tokenizer = load_harmony_tokenizer(path)
    model = GptOss.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # sharper than the init scale, so sampled text is not uniform noise
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6)
    return model, tokenizer
