"""segment_rewards and sequence_scores: segment ends from entropy spikes, rewards on tokens.

Triton: one program per row walks the response in blocks; segment ends, counts and the
per-segment (normalized) rewards are computed on the device with no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from ._checks import check_distribute, check_normalizer, check_rows, resolve_granularity
from ._dispatch import HAS_TRITON, use_triton
from .reference import SegmentRewards

if HAS_TRITON:
    import triton
    import triton.language as tl


def _segment_rewards_triton(rm_values, entropy, mask, granularity, threshold, has_eos, normalizer,
                            sigma_floor, distribute) -> SegmentRewards:
    raise NotImplementedError  # filled in by the Triton implementation


def _sequence_scores_triton(rm_values, entropy, mask, granularity, threshold, has_eos) -> torch.Tensor:
    raise NotImplementedError  # filled in by the Triton implementation


def segment_rewards(
    rm_values: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    granularity: str = "segment",
    threshold: float = 2.0,
    has_eos: torch.Tensor | None = None,
    normalizer: Sequence[float] | torch.Tensor | None = None,
    sigma_floor: float = 1e-2,
    distribute: str = "interpolate",
) -> SegmentRewards:
    """Dense rewards `[B, T]` f32, segment ends `[B, T]` bool and counts `[B]` int64 (DESIGN.md §3.1, §3.4).

    rm_values, entropy [B, T] float; response_mask [B, T] bool (prefix); has_eos [B] bool or None
    (every row ends with EOS); normalizer [a, b, c, d] or None.
    """
    mask = check_rows(response_mask, has_eos, rm_values=rm_values, entropy=entropy)
    granularity = resolve_granularity(granularity, threshold)
    check_distribute(distribute)
    params = check_normalizer(normalizer, sigma_floor)
    has_eos = has_eos.bool() if has_eos is not None else None
    args = (granularity, float(threshold), has_eos, params, float(sigma_floor), distribute)
    if use_triton(rm_values):
        return _segment_rewards_triton(rm_values, entropy, mask, *args)
    return reference.segment_rewards(
        rm_values, entropy, mask, granularity=granularity, threshold=float(threshold), has_eos=has_eos,
        normalizer=params, sigma_floor=float(sigma_floor), distribute=distribute,
    )


def sequence_scores(
    rm_values: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    granularity: str,
    threshold: float,
    has_eos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of `rm_values` at segment ends, `[B]` float32, differentiable w.r.t. `rm_values`."""
    mask = check_rows(response_mask, has_eos, rm_values=rm_values, entropy=entropy)
    granularity = resolve_granularity(granularity, threshold)
    has_eos = has_eos.bool() if has_eos is not None else None
    if use_triton(rm_values):
        return _sequence_scores_triton(rm_values, entropy, mask, granularity, float(threshold), has_eos)
    return reference.sequence_scores(
        rm_values, entropy, mask, granularity=granularity, threshold=float(threshold), has_eos=has_eos
    )
