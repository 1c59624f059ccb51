"""Before RM training: how the training responses segment, and the threshold when it is `auto`.

One segmenter pass over a seeded sample of the training pairs (`--segment-sample`, both responses
of each) gives the entropies at every position that can end a segment; `auto` takes τ as their
quantile for `--segment-length` (`segppo.segment_stats.auto_threshold`), and the statistics of the
segments at the final τ are measured on the same entropies. Ranks split the sample evenly (every
rank runs the same number of segmenter forwards, as ZeRO-3 needs) and gather the results, so all
ranks get the same τ. Token and bandit RMs need no segmenter: their sample is measured from lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segppo.data import EncodedPair, collate_preferences
from segppo.distributed import DistInfo
from segppo.kernels import segment_rewards
from segppo.segment_stats import (
    Candidates,
    SegmentStats,
    auto_threshold,
    candidate_entropies,
    segment_lengths,
)
from segppo.segments import Segmentation, segmenter_entropy


@dataclass
class SegmentSurvey:
    segmentation: Segmentation  # the final one (auto resolved to its τ)
    stats: SegmentStats
    threshold_choice: dict[str, Any] | None  # how τ was chosen (segment granularity only)
    pairs: int  # sampled training pairs

    def record(self) -> dict[str, Any]:
        """What `segppo.json` and `run_config.json` keep of the survey."""
        return {
            "granularity": self.segmentation.granularity,
            "threshold": self.threshold,
            "threshold_choice": self.threshold_choice,
            "segment_stats": {**self.stats.to_dict(), "sample_pairs": self.pairs},
        }

    @property
    def threshold(self) -> float | None:
        """τ of a segment-level RM; None for token and bandit, which have none."""
        return self.segmentation.threshold if self.segmentation.granularity == "segment" else None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SegmentSurvey:
        stats = record["segment_stats"]
        threshold = record["threshold"] if record["threshold"] is not None else 0.0
        segmentation = Segmentation(record["granularity"], float(threshold))
        return cls(
            segmentation, SegmentStats.from_record(stats), record["threshold_choice"], stats["sample_pairs"]
        )


def sample_indices(count: int, sample: int, seed: int, world_size: int) -> list[int]:
    """A seeded sample of `min(sample, count)` indices, cut to a multiple of `world_size` (at least
    `world_size` when `count` allows) so that ranks split it evenly."""
    size = min(sample, count)
    size = max(size - size % world_size, min(world_size, count))
    return sorted(np.random.default_rng(seed).permutation(count)[:size].tolist())


def survey_segments(
    segmenter,
    pairs: list[EncodedPair],
    *,
    granularity: str,
    threshold: float | str,
    segment_length: float,
    sample: int,
    seed: int,
    micro_batch_size: int,
    pad_token_id: int,
    info: DistInfo,
) -> SegmentSurvey:
    """Measure the segments of a sample of `pairs` (and choose τ when `threshold` is `auto`)."""
    auto = threshold == "auto"
    segmentation = Segmentation.resolve(granularity, 0.0 if auto else threshold)
    if auto and granularity == "segment":
        segmentation = Segmentation("segment", float("nan"))  # set below from the entropies
    chosen = sample_indices(len(pairs), sample, seed, info.world_size)
    mine = [pairs[i] for i in chosen[info.rank :: info.world_size]]
    batches = []  # (entropy, response mask, has_eos) on the CPU
    for start in range(0, len(mine), micro_batch_size):
        batch = collate_preferences(mine[start : start + micro_batch_size], pad_token_id).to(info.device)
        if segmentation.needs_entropy:
            entropy = segmenter_entropy(
                segmenter, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len
            )
        else:
            entropy = torch.zeros(batch.response_mask.shape, device=info.device)
        batches.append((entropy.float().cpu(), batch.response_mask.cpu(), batch.has_eos.cpu()))

    choice = None
    if segmentation.granularity == "segment":
        if auto:
            parts = _gather([candidate_entropies(*b) for b in batches], info)
            picked = auto_threshold(Candidates.merge(parts), segment_length)
            segmentation = Segmentation("segment", picked.threshold)
            choice = picked.to_dict()
        else:
            choice = {"rule": "given"}
    lengths, counts = [], []
    for entropy, mask, has_eos in batches:
        ends = segment_rewards(
            torch.zeros_like(entropy),
            entropy,
            mask,
            granularity=segmentation.granularity,
            threshold=segmentation.threshold,
            has_eos=has_eos,
            distribute="end",
        ).ends
        length, count = segment_lengths(ends)
        lengths.append(length)
        counts.append(count)
    gathered = _gather([(np.concatenate(lengths), np.concatenate(counts))] if lengths else [], info)
    stats = SegmentStats.from_lengths(
        np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])
    )
    return SegmentSurvey(segmentation, stats, choice, len(chosen))


def _gather(local: list, info: DistInfo) -> list:
    """Every rank's `local` items, concatenated in rank order (on every rank)."""
    if info.world_size == 1:
        return local
    parts = [None] * info.world_size
    torch.distributed.all_gather_object(parts, local)
    return [item for part in parts for item in part]
