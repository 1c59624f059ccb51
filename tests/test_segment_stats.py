"""Segment statistics and the `auto` entropy threshold (issue 20 item 2), on synthetic entropies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segppo.kernels import segment_rewards
from segppo.segment_stats import (
    Candidates,
    SegmentStats,
    auto_threshold,
    candidate_entropies,
    segment_lengths,
)


def _ends(entropy, mask, has_eos, threshold, granularity="segment"):
    return segment_rewards(
        torch.zeros_like(entropy),
        entropy,
        mask,
        granularity=granularity,
        threshold=threshold,
        has_eos=has_eos,
        distribute="end",
    ).ends


def _batch(lengths, seed=0, has_eos=True):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    entropy = torch.rand(len(lengths), width, generator=generator) * 4
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return entropy, mask, torch.full((len(lengths),), has_eos)


def test_segment_lengths_of_hand_made_ends():
    ends = torch.tensor(
        [
            [1, 0, 0, 1, 0, 1, 0],  # segments of 1, 3, 2 tokens
            [0, 0, 0, 0, 0, 0, 1],  # one segment of 7
            [0, 0, 0, 0, 0, 0, 0],  # an empty response: none
        ],
        dtype=torch.bool,
    )
    lengths, counts = segment_lengths(ends)
    assert lengths.tolist() == [1, 3, 2, 7]
    assert counts.tolist() == [3, 1, 0]


def test_stats_are_the_lengths_summary():
    stats = SegmentStats.from_lengths([1, 3, 2, 7, 2], [3, 2])
    assert stats.mean_length == pytest.approx(3.0) and stats.tokens == 15 and stats.segments == 5
    assert stats.median_length == 2 and stats.p10_length == pytest.approx(1.4)
    assert stats.p90_length == pytest.approx(5.4)
    assert stats.segments_per_response == 2.5 and stats.responses == 2


def test_candidates_are_the_positions_that_can_end_a_segment():
    # Lengths 5 with EOS (E = 3: candidates 0, 1, 2), 5 without (E = 4: 0..3), an EOS alone (none).
    entropy = torch.arange(15, dtype=torch.float32).view(3, 5)
    mask = torch.tensor([[1] * 5, [1] * 5, [1, 0, 0, 0, 0]], dtype=torch.bool)
    has_eos = torch.tensor([True, False, True])
    found = candidate_entropies(entropy, mask, has_eos)
    assert found.entropy.tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert found.tokens == 4 + 5 + 1 and found.responses == 3


def test_auto_ignores_the_positions_that_cannot_be_chosen():
    """The last span position always ends a segment and a trailing EOS never does, so their entropy
    (which is often the highest: the model is unsure what follows an answer) must not move τ."""
    entropy, mask, has_eos = _batch([12, 9, 20, 15])
    before = auto_threshold(candidate_entropies(entropy, mask, has_eos), 3.0).threshold
    lengths = mask.sum(-1)
    spiked = entropy.clone()
    spiked[torch.arange(4), lengths - 1] = 100.0  # at the EOS
    spiked[torch.arange(4), lengths - 2] = 100.0  # at E
    assert auto_threshold(candidate_entropies(spiked, mask, has_eos), 3.0).threshold == before


@pytest.mark.parametrize("target", [1.5, 3.0, 4.0, 6.5])
def test_auto_threshold_gives_the_target_mean_length(target):
    lengths = [int(n) for n in np.random.default_rng(1).integers(3, 60, size=64)]
    entropy, mask, has_eos = _batch(lengths, seed=2)
    choice = auto_threshold(candidate_entropies(entropy, mask, has_eos), target)
    got, counts = segment_lengths(_ends(entropy, mask, has_eos, choice.threshold))
    # One segment more or fewer than the target's exact count: the rounding of N/ℓ - R.
    assert got.sum() / (got.size + 1) <= target <= got.sum() / (got.size - 1)
    assert choice.quantile == pytest.approx(1 - (counts.sum() - 64) / choice.candidates)


def test_auto_threshold_extremes():
    entropy, mask, has_eos = _batch([10, 12, 8])
    candidates = candidate_entropies(entropy, mask, has_eos)
    longest = auto_threshold(candidates, 1000.0)  # longer than any response: one segment each
    _, counts = segment_lengths(_ends(entropy, mask, has_eos, longest.threshold))
    assert counts.tolist() == [1, 1, 1]
    shortest = auto_threshold(candidates, 1.0)  # every position ends a segment
    got, _ = segment_lengths(_ends(entropy, mask, has_eos, shortest.threshold))
    assert set(got.tolist()) == {1}
    with pytest.raises(ValueError, match="no response in the sample has two tokens"):
        auto_threshold(Candidates(np.zeros(0), 3, 3), 4.0)


def test_auto_threshold_steps_off_the_papers_sentinels():
    # Every candidate entropy is 0: τ = 0 would mean token level (DESIGN.md §3.1), so it is just above.
    choice = auto_threshold(Candidates(np.zeros(10), 20, 2), 20.0)
    assert choice.threshold > 0 and choice.threshold < 1e-300


def test_warnings_near_token_and_near_bandit():
    token_like = SegmentStats.from_lengths([1, 1, 2, 1, 1, 2], [3, 3])
    assert "near token level" in token_like.warning("segment")
    bandit_like = SegmentStats.from_lengths([30, 12, 25, 40], [1, 2, 1])
    assert "near bandit level" in bandit_like.warning("segment")
    phrases = SegmentStats.from_lengths([3, 5, 4, 2, 6, 4], [3, 3])
    assert phrases.warning("segment") is None
    assert token_like.warning("token") is None and bandit_like.warning("bandit") is None
