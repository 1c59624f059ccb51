"""Critic-free estimators on dense rewards (segppo.ppo.advantages) against hand-computed returns."""

import math

import pytest
import torch
from segppo.kernels import gae

from segppo.config import PPOConfig
from segppo.ppo.advantages import (
    ESTIMATORS,
    advantages_and_returns,
    group_ids_for,
    returns_to_go,
    whitens,
)

PAD = 100.0  # garbage in padding: it must never leak into returns or baselines


def _group_of_three():
    """Dense rewards of one prompt's 3 samples, lengths 3, 4, 1 (hand-computed below, γ = 1).

    G (returns-to-go): row 0 [3, 2, 0, 0], row 1 [2, 1.5, 1, .5], row 2 [4, 0, 0, 0]; G_0 = 3, 2, 4.
    """
    rewards = torch.tensor(
        [[1.0, 2.0, 0.0, PAD], [0.5, 0.5, 0.5, 0.5], [4.0, PAD, PAD, PAD]],
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    return rewards, mask


def test_returns_to_go_by_hand_with_padding_and_discount():
    rewards, mask = _group_of_three()
    expected = torch.tensor([[3.0, 2.0, 0.0, 0.0], [2.0, 1.5, 1.0, 0.5], [4.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(returns_to_go(rewards, mask), expected)
    # γ = 0.5 on [1, 2, 4]: G = [1 + 1 + 1, 2 + 2, 4]
    discounted = returns_to_go(torch.tensor([[1.0, 2.0, 4.0, PAD]]), torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    torch.testing.assert_close(discounted, torch.tensor([[3.0, 4.0, 4.0, 0.0]]))


def test_rloo_leave_one_out_baseline_on_dense_returns():
    rewards, mask = _group_of_three()
    adv, ret = advantages_and_returns("rloo", rewards, mask, group_ids=group_ids_for(3, 3))
    # baselines: row 0 (2+4)/2 = 3, row 1 (3+4)/2 = 3.5, row 2 (3+2)/2 = 2.5 (never the row itself)
    expected = torch.tensor([[0.0, -1.0, -3.0, 0.0], [-1.5, -2.0, -2.5, -3.0], [1.5, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, returns_to_go(rewards, mask))


def test_grpo_group_mean_and_unbiased_std_on_dense_returns():
    rewards, mask = _group_of_three()
    adv, _ = advantages_and_returns("grpo", rewards, mask, group_ids=group_ids_for(3, 3))
    # G_0 = 3, 2, 4: mean 3, unbiased std sqrt((0 + 1 + 1) / 2) = 1 (a population std would be 0.816)
    expected = torch.tensor([[0.0, -1.0, -3.0, 0.0], [-1.0, -1.5, -2.0, -2.5], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected / (1.0 + 1e-6))


def test_groups_by_id_are_independent_and_need_not_be_contiguous():
    rewards, mask = _group_of_three()
    # a second prompt's pair interleaved with the first group: G_0 = 10 and 6
    other = torch.tensor([[10.0, PAD, PAD, PAD], [3.0, 3.0, PAD, PAD]])
    other_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rows = torch.cat([rewards[:1], other[:1], rewards[1:], other[1:]])
    rows_mask = torch.cat([mask[:1], other_mask[:1], mask[1:], other_mask[1:]])
    ids = torch.tensor([7, 3, 7, 7, 3])
    adv, _ = advantages_and_returns("rloo", rows, rows_mask, group_ids=ids)
    torch.testing.assert_close(adv[0], torch.tensor([0.0, -1.0, -3.0, 0.0]))
    torch.testing.assert_close(adv[1], torch.tensor([10.0 - 6.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(adv[4], torch.tensor([6.0 - 10.0, 3.0 - 10.0, 0.0, 0.0]))


def test_bandit_reward_reduces_to_the_usual_estimators_for_any_lengths():
    # one reward at the last token of responses of lengths 2, 3, 1, 4; R = 1, 0, 3, 2
    lengths, final = [2, 3, 1, 4], [1.0, 0.0, 3.0, 2.0]
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.zeros(4, 4)
    for row, (length, r) in enumerate(zip(lengths, final, strict=True)):
        rewards[row, length - 1] = r
    ids = group_ids_for(4, 4)

    rloo, _ = advantages_and_returns("rloo", rewards, mask, group_ids=ids)
    per_sample = torch.tensor([1 - 5 / 3, 0 - 2, 3 - 1, 2 - 4 / 3])  # R_i − mean of the 3 others
    torch.testing.assert_close(rloo, torch.where(mask, per_sample[:, None], 0.0))

    grpo, _ = advantages_and_returns("grpo", rewards, mask, group_ids=ids)
    std = math.sqrt((0.25 + 2.25 + 2.25 + 0.25) / 3)  # around mean 1.5, unbiased
    per_sample = (torch.tensor(final) - 1.5) / (std + 1e-6)
    torch.testing.assert_close(grpo, torch.where(mask, per_sample[:, None], 0.0))

    reinforce, returns = advantages_and_returns("reinforce++", rewards, mask)
    torch.testing.assert_close(reinforce, torch.where(mask, torch.tensor(final)[:, None], 0.0))
    torch.testing.assert_close(returns, reinforce)


def test_kl_in_the_token_rewards_enters_returns_and_group_statistics():
    # bandit 1.0 and 0.0 at the last of 2 tokens, a −0.1 KL term on each token
    rewards = torch.tensor([[-0.1, 0.9], [-0.1, -0.1]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv, ret = advantages_and_returns("rloo", rewards, mask, group_ids=group_ids_for(2, 2))
    torch.testing.assert_close(ret, torch.tensor([[0.8, 0.9], [-0.2, -0.1]]))
    # baselines: the other's G_0: −0.2 for row 0, 0.8 for row 1
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.1], [-1.0, -0.9]]))


def test_gae_estimator_is_the_gae_kernel():
    rewards, mask = _group_of_three()
    values = torch.tensor([[0.5, 0.1, -0.2, 9.0], [0.3, 0.3, 0.3, 0.3], [1.0, 9.0, 9.0, 9.0]])
    got = advantages_and_returns("gae", rewards, mask, values=values, gamma=0.9, lam=0.8)
    want = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="needs the critic's values"):
        advantages_and_returns("gae", rewards, mask)


def test_whitening_per_estimator():
    assert whitens("reinforce++", False) and whitens("reinforce++", True)
    assert not whitens("grpo", True)
    assert whitens("gae", True) and not whitens("gae", False)
    assert whitens("rloo", True) and not whitens("rloo", False)


def test_bad_input_is_refused_with_one_line_errors():
    rewards, mask = _group_of_three()
    with pytest.raises(ValueError, match="one of"):
        advantages_and_returns("ppo", rewards, mask)
    with pytest.raises(ValueError, match="needs group_ids"):
        advantages_and_returns("grpo", rewards, mask)
    with pytest.raises(ValueError, match="at least 2 samples in every group"):
        advantages_and_returns("rloo", rewards, mask, group_ids=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="whole number of groups"):
        group_ids_for(5, 2)
    with pytest.raises(ValueError, match="differ"):
        advantages_and_returns("reinforce++", rewards, mask[:, :2])


def _ppo(**kw):
    return PPOConfig(policy="p", reward_model="r", prompts="d", output="o", **kw)


def test_config_fields_defaults_and_validation():
    cfg = _ppo()
    assert (cfg.advantage, cfg.n_samples_per_prompt) == ("gae", 1)
    assert set(ESTIMATORS) == {"gae", "rloo", "grpo", "reinforce++"}
    _ppo(advantage="grpo", n_samples_per_prompt=2)
    _ppo(advantage="reinforce++")
    for estimator in ("rloo", "grpo"):
        with pytest.raises(ValueError, match="needs --n-samples-per-prompt >= 2"):
            _ppo(advantage=estimator)
    with pytest.raises(ValueError, match="--advantage must be one of"):
        _ppo(advantage="vtrace")
    with pytest.raises(ValueError, match="--n-samples-per-prompt must be a positive integer"):
        _ppo(n_samples_per_prompt=0)
