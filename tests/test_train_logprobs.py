"""``ossrl.train.logprobs_of`` (the trainer's log-prob path) against the engine's sampler log-probs, and the packed
log-probs the loss uses on a multi-turn batch (tool tokens excluded by the loss mask)."""

import pytest
import torch
from rollout_helpers import prompts

from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.train import logprobs_of
from ossrl.train.batching import pack_micro_batches, pack_sequences
from ossrl.train.logprobs import packed_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_of_equals_the_engines_sampled_logprobs(tiny, temperature):
    model, tokenizer = tiny
    ps = prompts(3)
    sampling = SamplingParams(temperature=temperature, max_new_tokens=12, stop_token_ids=[], seed=5)
    out = Engine(model, tokenizer, kv_cache_tokens=2048).generate([Request(p, n=2) for p in ps], sampling)
    flat_p = [p for p in ps for _ in range(2)]
    flat_c = [c for group in out for c in group]
    with torch.no_grad():
        got = logprobs_of(model, flat_p, [c.token_ids for c in flat_c], temperature=temperature)
    assert [g.dtype for g in got] == [torch.float32] * 6 and [len(g) for g in got] == [12] * 6
    for g, c in zip(got, flat_c, strict=True):
        torch.testing.assert_close(g, torch.tensor(c.logprobs), atol=1e-4, rtol=0)


def test_loss_path_takes_only_sampled_tokens_of_a_multi_turn_batch(tiny):
    model, _ = tiny
    ps = prompts(2)
    completions = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    masks = [[1, 1, 0, 0, 1, 1], [1, 0, 1]]  # 0: tool-result tokens the engine appended
    batch = pack_sequences(ps, completions, masks)
    with torch.no_grad():
        full = logprobs_of(model, ps, completions)
        sampled, _ = packed_logprobs(model, batch.tokens, batch.cu_seqlens, batch.loss_mask)
    expected = torch.cat([f[torch.tensor(m, dtype=torch.bool)] for f, m in zip(full, masks, strict=True)])
    torch.testing.assert_close(sampled, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="first of its sequence"):
        packed_logprobs(model, batch.tokens, batch.cu_seqlens, torch.ones_like(batch.loss_mask))


def test_pack_micro_batches_and_bad_input():
    assert pack_micro_batches([3, 4, 10, 1, 1], 8) == [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="empty prompt"):
        pack_sequences([[]], [[1]])
    with pytest.raises(ValueError, match="loss-mask entries"):
        pack_sequences([[1]], [[2, 3]], [[1]])
