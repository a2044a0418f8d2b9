"""Shared by the rollout tests: random prompts and a scripted policy (the ``tiny`` fixture is in conftest)."""

import torch

from ossrl.model import GptOss


def prompts(n, lengths=(5, 23, 11, 40, 2, 17)):
    """Random prompts of token ids below the tiny tokenizer's vocabulary (~1260 tokens)."""
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(10, 1200, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


class ScriptedHead(torch.nn.Module):
    """Replaces lm_head: the next token comes from a script, one entry per forward (one running sequence)."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__()
        self.vocab_size, self.script, self.cursor = vocab_size, script, 0

    def forward(self, hidden):
        logits = torch.full((hidden.shape[0], self.vocab_size), -30.0)
        logits[:, self.script[min(self.cursor, len(self.script) - 1)]] = 30.0
        self.cursor += 1
        return logits


def scripted_policy(base: GptOss, script: list[int]) -> GptOss:
    """The real model and KV-cache path, with a scripted next token."""
    policy = GptOss(base.config)
    policy.load_state_dict(base.state_dict())
    policy.lm_head = ScriptedHead(base.config.vocab_size, script)
    return policy.eval()
