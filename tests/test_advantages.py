"""Critic-free estimators on dense rewards (segppo.ppo.advantages) against hand-computed returns."""

import math

import pytest
import torch

from segppo.config import PPOConfig
from segppo.kernels import gae, segment_rewards
from segppo.ppo.advantages import (
    ESTIMATORS,
    GROUP_ESTIMATORS,
    advantages_and_returns,
    group_ids_for,
    returns_to_go,
    whitens,
)
from segppo.ppo.rollout import RewardShaping, reward_positions
from segppo.segments import Segmentation

PAD = 100.0  # garbage in padding: it must never leak into returns or baselines


def _group_of_three():
    """One prompt's 3 samples, lengths 3, 4, 1: task rewards (the dense RM reward, no KL) on the
    reward-bearing tokens, none on row 0's last token (an EOS outside every segment).

    Bearing rewards: row 0 [2, 4], row 1 [0, 1, 1, 0], row 2 [6]: 7 of them, sum 14, mean 2.
    """
    rewards = torch.tensor([[2.0, 4.0, 0.0, PAD], [0.0, 1.0, 1.0, 0.0], [6.0, PAD, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    positions = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    return rewards, mask, positions


def _group(estimator, rewards, mask, positions, task_rewards=None, n=None):
    """The estimator on one group (or groups of `n` consecutive rows)."""
    ids = group_ids_for(rewards.shape[0], n or rewards.shape[0])
    task = rewards if task_rewards is None else task_rewards
    return advantages_and_returns(
        estimator, rewards, mask, group_ids=ids, task_rewards=task, reward_positions=positions
    )


def test_returns_to_go_by_hand_with_padding_and_discount():
    rewards, mask, _ = _group_of_three()
    expected = torch.tensor([[6.0, 4.0, 0.0, 0.0], [2.0, 2.0, 1.0, 0.0], [6.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(returns_to_go(rewards, mask), expected)
    # γ = 0.5 on [1, 2, 4]: G = [1 + 1 + 1, 2 + 2, 4]
    discounted = returns_to_go(torch.tensor([[1.0, 2.0, 4.0, PAD]]), torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    torch.testing.assert_close(discounted, torch.tensor([[3.0, 4.0, 4.0, 0.0]]))


def test_grpo_normalises_each_reward_by_the_group_then_takes_returns_to_go():
    rewards, mask, positions = _group_of_three()
    adv, ret = _group("grpo", rewards, mask, positions)
    # Deviations from the mean 2: [0, 2], [-2, -1, -1, -2], [4]; squares sum to 30 over 7 rewards,
    # so the unbiased std is sqrt(30 / 6) = sqrt(5). Returns-to-go of the deviations / sqrt(5):
    expected = torch.tensor([[2.0, 2.0, 0.0, 0.0], [-6.0, -4.0, -3.0, -2.0], [4.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected / (math.sqrt(5.0) + 1e-6))
    torch.testing.assert_close(ret, returns_to_go(rewards, mask))  # returns are the raw returns-to-go


def test_rloo_subtracts_the_other_samples_mean_reward_from_each_reward():
    rewards, mask, positions = _group_of_three()
    adv, _ = _group("rloo", rewards, mask, positions)
    # Baseline per reward: the mean bearing reward of the *other* rows: row 0 (0+1+1+0+6)/5 = 1.6,
    # row 1 (2+4+6)/3 = 4, row 2 (2+4+0+1+1+0)/6 = 4/3. Returns-to-go of (reward - baseline):
    expected = torch.tensor(
        [[0.4 + 2.4, 2.4, 0.0, 0.0], [-4.0 - 3 - 3 - 4, -3.0 - 3 - 4, -3.0 - 4, -4.0], [6 - 4 / 3, 0, 0, 0]]
    )
    torch.testing.assert_close(adv, expected)


def test_identical_samples_get_no_group_advantage():
    # Two identical samples, 4 reward-bearing tokens each (the dense rewards [1, -1, 0.5, 0]):
    # the old baseline from G_0 gave [0, -1e6, 0, -5e5].
    rewards = torch.tensor([[1.0, -1.0, 0.5, 0.0]] * 2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    for estimator in GROUP_ESTIMATORS:
        adv, _ = _group(estimator, rewards, mask, mask)
        torch.testing.assert_close(adv[0], adv[1])
        # The first token's advantage (the whole sample against the group) is 0; the later
        # ones are the sample's own credit (reward to come against the group's mean reward), bounded:
        # mean 0.125, and for grpo the unbiased std over 8 rewards sqrt(4.375 / 7).
        scale = math.sqrt(4.375 / 7) + 1e-6 if estimator == "grpo" else 1.0
        expected = torch.tensor([0.0, -0.875, 0.25, -0.125]) / scale
        torch.testing.assert_close(adv[0], expected)
        assert adv[:, 0].abs().max() < 1e-6  # float32 rounding of the sum
    # Identical samples whose bearing rewards are all equal (one interpolated segment): 0 everywhere.
    for estimator in GROUP_ESTIMATORS:
        adv, _ = _group(estimator, torch.full((3, 4), 0.25), mask[:1].expand(3, 4), mask[:1].expand(3, 4))
        assert adv.abs().max() == 0.0


def _bandit_with_kl(final, kl, length=4):
    """Rows with task reward `final[i]` at the last of `length` tokens and −`kl[i]` at every token."""
    n = len(final)
    task = torch.zeros(n, length)
    task[:, -1] = torch.tensor(final)
    kl_part = -torch.tensor(kl)[:, None].expand(n, length)
    positions = torch.zeros(n, length, dtype=torch.bool)
    positions[:, -1] = True
    return task + kl_part, task, positions, torch.ones(n, length, dtype=torch.bool)


def test_bandit_reward_with_a_kl_penalty_reduces_to_the_bandit_case():
    # The example: R = 0.7 twice with −0.002 of KL on every token ([−.002, −.002, −.002, .698]);
    # the old estimators gave grpo [0, 2000, 4000, 6000]. The bandit case is 0; the KL adds its own
    # return-to-go, unnormalised.
    rewards, task, positions, mask = _bandit_with_kl([0.7, 0.7], [0.002, 0.002])
    for estimator in GROUP_ESTIMATORS:
        adv, _ = _group(estimator, rewards, mask, positions, task)
        torch.testing.assert_close(adv, torch.tensor([[-0.008, -0.006, -0.004, -0.002]] * 2))
    # Different bandit rewards: the bandit advantages plus the KL's return-to-go, for any KL.
    rewards, task, positions, mask = _bandit_with_kl([1.0, 0.0, 3.0], [0.01, 0.03, 0.002])
    for estimator in GROUP_ESTIMATORS:
        with_kl, _ = _group(estimator, rewards, mask, positions, task)
        bandit, _ = _group(estimator, task, mask, positions, task)
        torch.testing.assert_close(with_kl, bandit + returns_to_go(rewards - task, mask))


def test_near_ties_give_bounded_advantages():
    # Equal bandit rewards, KL differing by 1e-4: the old grpo gave advantages of ~1e4.
    rewards, task, positions, mask = _bandit_with_kl([0.7, 0.7], [0.0, 1e-4])
    for estimator in GROUP_ESTIMATORS:
        adv, _ = _group(estimator, rewards, mask, positions, task)
        assert adv.abs().max() <= 4e-4 * 1.01, (estimator, adv)
    # Task rewards 1e-4 apart: rloo's advantages are of the gap's size; grpo's are z-scores, whose size
    # in a group of N rewards is at most (N - 1) / sqrt(N) whatever the gap (GRPO's normalisation).
    rewards, task, positions, mask = _bandit_with_kl([0.7, 0.7001, 0.7], [0.0, 0.0, 0.0])
    rloo, _ = _group("rloo", rewards, mask, positions, task)
    assert rloo.abs().max() <= 1e-4 * (1 + 1e-3)
    grpo, _ = _group("grpo", rewards, mask, positions, task)
    assert grpo.abs().max() <= 2 / math.sqrt(3) + 1e-5
    # Dense rewards with a spread of ~1e-6 over many tokens: still z-scores, never 1/eps.
    dense = 0.3 + 1e-6 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(4, 16, dtype=torch.bool)
    adv, _ = _group("grpo", dense, ones, ones)
    # 64 z-scores have Σz² = 63, so 16 of them sum to at most sqrt(16 · 63) (Cauchy-Schwarz)
    assert adv.abs().max() <= math.sqrt(16 * 63)


def test_groups_by_id_are_independent_and_need_not_be_contiguous():
    rewards, mask, positions = _group_of_three()
    # a second prompt's pair interleaved with the first group: bearing rewards [10] and [3, 3]
    other = torch.tensor([[10.0, PAD, PAD, PAD], [3.0, 3.0, PAD, PAD]])
    other_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rows = torch.cat([rewards[:1], other[:1], rewards[1:], other[1:]])
    rows_mask = torch.cat([mask[:1], other_mask[:1], mask[1:], other_mask[1:]])
    rows_positions = torch.cat([positions[:1], other_mask[:1], positions[1:], other_mask[1:]])
    ids = torch.tensor([7, 3, 7, 7, 3])
    adv, _ = advantages_and_returns(
        "rloo", rows, rows_mask, group_ids=ids, task_rewards=rows, reward_positions=rows_positions
    )
    torch.testing.assert_close(adv[0], torch.tensor([2.8, 2.4, 0.0, 0.0]))  # as in its own group
    torch.testing.assert_close(adv[1], torch.tensor([10.0 - 3.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(adv[4], torch.tensor([-14.0, -7.0, 0.0, 0.0]))  # (3 - 10) per reward


def test_bandit_reward_reduces_to_the_usual_estimators_for_any_lengths():
    # one reward at the last token of responses of lengths 2, 3, 1, 4; R = 1, 0, 3, 2
    lengths, final = [2, 3, 1, 4], [1.0, 0.0, 3.0, 2.0]
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.zeros(4, 4)
    positions = torch.zeros(4, 4, dtype=torch.bool)
    for row, (length, r) in enumerate(zip(lengths, final, strict=True)):
        rewards[row, length - 1] = r
        positions[row, length - 1] = True

    rloo, _ = _group("rloo", rewards, mask, positions)
    per_sample = torch.tensor([1 - 5 / 3, 0 - 2, 3 - 1, 2 - 4 / 3])  # R_i − mean of the 3 others
    torch.testing.assert_close(rloo, torch.where(mask, per_sample[:, None], 0.0))

    grpo, _ = _group("grpo", rewards, mask, positions)
    std = math.sqrt((0.25 + 2.25 + 2.25 + 0.25) / 3)  # around mean 1.5, unbiased
    per_sample = (torch.tensor(final) - 1.5) / (std + 1e-6)
    torch.testing.assert_close(grpo, torch.where(mask, per_sample[:, None], 0.0))

    reinforce, returns = advantages_and_returns("reinforce++", rewards, mask)
    torch.testing.assert_close(reinforce, torch.where(mask, torch.tensor(final)[:, None], 0.0))
    torch.testing.assert_close(returns, reinforce)


def test_reinforce_plus_plus_is_the_return_to_go_of_every_reward_kl_included():
    rewards, task, _, mask = _bandit_with_kl([1.0, 0.0], [0.1, 0.2], length=2)
    adv, ret = advantages_and_returns("reinforce++", rewards, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.9], [-0.4, -0.2]]))  # whitened later
    torch.testing.assert_close(ret, adv)


def test_gae_estimator_is_the_gae_kernel():
    rewards, mask, _ = _group_of_three()
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
    rewards, mask, positions = _group_of_three()
    with pytest.raises(ValueError, match="one of"):
        advantages_and_returns("ppo", rewards, mask)
    with pytest.raises(ValueError, match="needs group_ids"):
        advantages_and_returns("grpo", rewards, mask, task_rewards=rewards, reward_positions=positions)
    with pytest.raises(ValueError, match="needs the task rewards and their positions"):
        advantages_and_returns("grpo", rewards, mask, group_ids=group_ids_for(3, 3))
    with pytest.raises(ValueError, match="task_rewards .* differ"):
        advantages_and_returns(
            "rloo",
            rewards,
            mask,
            group_ids=group_ids_for(3, 3),
            task_rewards=rewards[:2],
            reward_positions=positions,
        )
    with pytest.raises(ValueError, match="at least 2 samples in every group"):
        advantages_and_returns(
            "rloo",
            rewards,
            mask,
            group_ids=torch.tensor([0, 0, 1]),
            task_rewards=rewards,
            reward_positions=positions,
        )
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


def _shaping(granularity, distribute, penalty=None):
    return RewardShaping(
        segmentation=Segmentation(granularity, 2.0),
        normalizer=None,
        sigma_floor=1e-2,
        distribute=distribute,
        reward_clip=10.0,
        kl_estimator="k1",
        missing_eos_penalty=penalty,
        overlong_penalty=None,
        max_response_len=None,
    )


def test_reward_positions_are_the_tokens_the_task_reward_is_placed_on():
    # Row 0: 5 tokens, the last an EOS; entropy spikes after token 1: segments [0, 1] and [2, 3].
    # Row 1: 3 tokens cut off (no EOS): one segment [0, 2].
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    has_eos = torch.tensor([True, False])
    entropy = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    rm_values = torch.ones(2, 5)

    def positions(granularity, distribute, penalty=None):
        segments = segment_rewards(
            rm_values,
            entropy,
            mask,
            granularity=granularity,
            threshold=2.0,
            has_eos=has_eos,
            distribute=distribute,
        )
        return reward_positions(segments, mask, _shaping(granularity, distribute, penalty)).int().tolist()

    assert positions("segment", "interpolate") == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert positions("segment", "repeat") == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert positions("segment", "end") == [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]]
    assert positions("bandit", "interpolate") == [[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]]
    # A penalty lands on the last token, which then bears a reward (0 or the penalty) in every row.
    assert positions("segment", "end", penalty=-1.0) == [[0, 1, 0, 1, 1], [0, 0, 1, 0, 0]]
