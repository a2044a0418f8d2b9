"""Advantages and DAPO extras against hand-computed numbers."""

import pytest
import torch

from ossrl.rl import (
    compute_advantages,
    dr_grpo_advantages,
    filter_groups,
    grpo_advantages,
    make_group_ids,
    overlong_penalty,
    rloo_advantages,
)

# Three groups with non-contiguous ids: {0: [1, 0, 1, 0]}, {1: [2, 2]} (all equal), {7: [5]} (size one).
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 5.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 7])


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_grpo_group_std():
    # group 0: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735; (+-0.5) / 0.57735 = +-0.866025
    # group 1: all equal -> 0; group 7: size one -> 0
    close(grpo_advantages(REWARDS, GROUPS), [0.866025, -0.866025, 0.866025, -0.866025, 0.0, 0.0, 0.0])


def test_grpo_batch_std():
    # batch: sum r = 11, sum r^2 = 35, N = 7 -> sum of squared deviations = 35 - 121/7 = 124/7,
    # unbiased var = 124/42 = 2.952381, std = 1.718249; group 0: +-0.5 / 1.718249 = +-0.290994
    close(grpo_advantages(REWARDS, GROUPS, scale="batch"), [0.290994, -0.290994, 0.290994, -0.290994, 0, 0, 0])


def test_dr_grpo_no_std():
    # r - group mean
    close(dr_grpo_advantages(REWARDS, GROUPS), [0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0], atol=0)
    close(grpo_advantages(REWARDS, GROUPS, scale="none"), [0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0], atol=0)


def test_rloo_leave_one_out():
    # r=1: others (0, 1, 0) mean 1/3 -> 2/3; r=0: others (1, 0, 1) mean 2/3 -> -2/3; size one -> 0
    close(rloo_advantages(REWARDS, GROUPS), [2 / 3, -2 / 3, 2 / 3, -2 / 3, 0.0, 0.0, 0.0])
    # with group std scaling: (2/3) / 0.57735 = 1.154701
    close(rloo_advantages(REWARDS, GROUPS, scale="group"), [1.154701, -1.154701, 1.154701, -1.154701, 0, 0, 0])


def test_rloo_uneven_values():
    # group [3, 0, 0]: 3 - 0 = 3; 0 - (3 + 0) / 2 = -1.5 (twice)
    close(rloo_advantages(torch.tensor([[3.0, 0.0, 0.0]])), [[3.0, -1.5, -1.5]])


def test_grouped_shape_helper():
    # [G, n] = [[1, 0], [2, 4]]: group 0 mean .5, std sqrt(.5) = .707107 -> +-.707107;
    # group 1 mean 3, std sqrt(2) -> (2-3)/1.414214 = -.707107, (4-3)/1.414214 = +.707107
    out = grpo_advantages(torch.tensor([[1.0, 0.0], [2.0, 4.0]]))
    assert out.shape == (2, 2)
    close(out, [[0.707107, -0.707107], [-0.707107, 0.707107]])
    assert make_group_ids(2, 3).tolist() == [0, 0, 0, 1, 1, 1]
    flat = grpo_advantages(torch.tensor([1.0, 0.0, 2.0, 4.0]), make_group_ids(2, 2))
    close(flat, [0.707107, -0.707107, -0.707107, 0.707107])


def test_integer_rewards_and_unordered_ids():
    # ids interleaved: group 5 = [1, 3] (mean 2), group 2 = [0, 0]; Dr.GRPO -> [-1, 0, 1, 0]
    out = dr_grpo_advantages(torch.tensor([1, 0, 3, 0]), torch.tensor([5, 2, 5, 2]))
    assert out.dtype == torch.float32
    close(out, [-1.0, 0.0, 1.0, 0.0], atol=0)


def test_single_group_of_one_and_all_equal():
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
        assert fn(torch.tensor([[7.0]])).tolist() == [[0.0]]
        assert fn(torch.tensor([[3.0, 3.0, 3.0]])).tolist() == [[0.0, 0.0, 0.0]]
    assert grpo_advantages(torch.tensor([[7.0]]), scale="batch").tolist() == [[0.0]]


def test_compute_advantages_dispatch():
    close(compute_advantages("grpo", REWARDS, GROUPS), [0.866025, -0.866025, 0.866025, -0.866025, 0, 0, 0])
    close(compute_advantages("dr_grpo", REWARDS, GROUPS), [0.5, -0.5, 0.5, -0.5, 0, 0, 0])
    close(compute_advantages("rloo", REWARDS, GROUPS), [2 / 3, -2 / 3, 2 / 3, -2 / 3, 0, 0, 0])
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo", REWARDS, GROUPS)
    with pytest.raises(ValueError, match="dr_grpo does not scale"):
        compute_advantages("dr_grpo", REWARDS, GROUPS, scale="group")


def test_advantage_errors():
    with pytest.raises(ValueError, match=r"\[G, n\]"):
        grpo_advantages(REWARDS)  # 1-D without ids
    with pytest.raises(ValueError, match=r"\[N\]"):
        grpo_advantages(REWARDS, GROUPS[:-1])
    with pytest.raises(ValueError, match=r"\[N\]"):
        grpo_advantages(REWARDS.reshape(7, 1), GROUPS)
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(REWARDS, GROUPS.float())
    with pytest.raises(ValueError, match="unknown scale"):
        grpo_advantages(REWARDS, GROUPS, scale="global")
    with pytest.raises(ValueError, match="group_size"):
        make_group_ids(2, 0)


def test_filter_groups():
    # group 0 has different rewards (keep), group 1 all equal, group 7 size one (drop)
    assert filter_groups(REWARDS, GROUPS).tolist() == [True, True, True, True, False, False, False]
    # [G, n] input -> one flag per group
    assert filter_groups(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])).tolist() == [True, False, False]
    # tolerance for float noise
    noisy = torch.tensor([[1.0, 1.0 + 1e-6]], dtype=torch.float64)
    assert filter_groups(noisy).tolist() == [True]
    assert filter_groups(noisy, atol=1e-5).tolist() == [False]


def test_overlong_penalty():
    # max_len 10, buffer 4 -> expected length 6; L=7: (6-7)/4 = -.25, L=8: -.5, L=10: -1, L=12 (over) -1
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    close(overlong_penalty(lengths, 10, 4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0], atol=0)
    close(overlong_penalty(lengths, 10, 4, penalty=0.5), [0.0, 0.0, -0.125, -0.25, -0.5, -0.5], atol=0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, 10, 0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="integer"):
        overlong_penalty(lengths.float(), 10, 4)
