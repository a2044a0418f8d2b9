"""RolloutBatch: the packed tensors the engine hands to the trainer (select, cat, host views)."""

import pytest
import torch

from ossrl.rollout.batch import RolloutBatch


def make_batch(prompts, completions, masks, group, *, device="cpu"):
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    mask = torch.tensor([b for p, m in zip(prompts, masks, strict=True) for b in [False] * len(p) + m])
    lp = torch.where(mask, -torch.arange(1, mask.numel() + 1, dtype=torch.float32) / 10, torch.zeros(()))
    n = len(seqs)
    return RolloutBatch(
        tokens=torch.tensor([t for s in seqs for t in s]), cu_seqlens=cu,
        prompt_lens=torch.tensor([len(p) for p in prompts]),
        loss_mask=mask, sampler_logprobs=lp, group=torch.tensor(group), sample=torch.arange(n) % 2,
        finish=torch.zeros(n, dtype=torch.long), num_tool_calls=torch.zeros(n, dtype=torch.long),
        tool_errors=torch.zeros(n, dtype=torch.long), seconds=torch.zeros(n, dtype=torch.float64),
    )  # fmt: skip


def test_select_cat_and_host_views_keep_every_field_aligned():
    b = make_batch([[1, 2], [1, 2], [3]], [[5, 6, 7], [8], [9, 10]], [[True, False, True], [True], [True, True]],
                   [0, 0, 1])  # fmt: skip
    assert b.prompt_ids() == [[1, 2], [1, 2], [3]] and b.completion_ids() == [[5, 6, 7], [8], [9, 10]]
    assert b.sampled_lens.tolist() == [2, 1, 2] and b.completion_lens.tolist() == [3, 1, 2]
    s = b.select([2, 0])
    assert s.completion_ids() == [[9, 10], [5, 6, 7]] and s.group.tolist() == [1, 0]
    assert (
        s.sampler_logprobs.tolist() == b.select([2]).sampler_logprobs.tolist() + b.select([0]).sampler_logprobs.tolist()
    )
    both = RolloutBatch.cat([b, s])
    assert both.num_seqs == 5 and both.group.tolist() == [0, 0, 1, 3, 2]  # groups of the second batch never merge
    assert both.completion_ids()[3:] == s.completion_ids()
    groups = b.completions()
    assert [len(g) for g in groups] == [2, 1] and groups[0][0].token_ids == [5, 6, 7]
    assert groups[0][0].loss_mask == [1, 0, 1] and groups[0][0].logprobs[1] == 0.0
    assert b.select([]).num_seqs == 0


def test_bad_shapes_are_named():
    b = make_batch([[1]], [[2]], [[True]], [0])
    with pytest.raises(ValueError, match="loss_mask"):
        RolloutBatch(**{**b.__dict__, "loss_mask": torch.ones(5, dtype=torch.bool)})
