"""How long segments are, and the entropy threshold that gives a chosen length (`--entropy-threshold auto`).

A threshold τ means different things on different models: the paper set τ by hand per model family
(2.0 for Llama-3, 1.75 for Phi-3), and on SmolLM2-135M τ = 2.0 cuts words into single tokens. What
carries over between models is the length of the segments. So `rm train` measures it (tokens per
segment, segments per response: `SegmentStats`), warns when segments are near token level or near
one per response, and with `auto` picks τ as the quantile of the segmenter's entropy that gives a
target mean length on a sample of the training responses (`auto_threshold`).

Positions follow DESIGN.md §3.1: a dense response of length L with a trailing EOS segments the span
`0..E`, `E = L-1-has_eos`; its last segment always ends at E, and the other ends are the positions
`t < E` whose entropy is strictly greater than τ. Those positions, and only those, are the candidates
the quantile is taken over. Pure numpy/torch; no models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

# The default target of `--entropy-threshold auto`, in tokens per segment: a short phrase. Measured
# (issue 20): the demo's hand-set τ = 1 gives 2.0 (word-level) tokens per segment, a slot or value
# word with what follows it (its phrases average 3.5 tokens), and two English words are about 2.7 BPE
# tokens; on SmolLM2-135M-Instruct's answers 3 tokens per segment (τ ≈ 2.9) cuts at phrase starts
# ("sun was shining | outside when I visited"), 4 at clauses, while the paper's τ = 2 gives 1.85 and
# splits words ("Mar|quee"). The paper's own families (Llama-3, Phi-3) cannot be measured here.
DEFAULT_SEGMENT_LENGTH = 3.0
# Below this mean, segments are shorter than an English word (about 1.3 BPE tokens), so most are
# single tokens or word pieces: token-level RLHF in all but name.
TOKEN_LEVEL_MEAN_LENGTH = 1.5
# Below this many segments per response on average, most responses are one segment: the reward is
# read at (nearly) one place per response, as a bandit RM's is.
BANDIT_LEVEL_SEGMENTS = 2.0


@dataclass
class SegmentStats:
    """Tokens per segment (mean, median, 10th and 90th percentile) and segments per response."""

    responses: int
    segments: int
    tokens: int  # segmented tokens (a dense response's trailing EOS is in no segment)
    mean_length: float  # tokens / segments: the mean over all segments
    median_length: float
    p10_length: float
    p90_length: float
    segments_per_response: float  # mean
    median_segments_per_response: float

    @classmethod
    def from_lengths(cls, lengths, segments_per_response) -> SegmentStats:
        """From every segment's length and every response's segment count (1-D arrays)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        counts = np.asarray(segments_per_response, dtype=np.int64)
        if counts.size == 0 or lengths.size == 0:
            raise ValueError("no segments to measure: the sample has no responses")
        p10, median, p90 = np.percentile(lengths, [10, 50, 90])
        return cls(
            responses=int(counts.size),
            segments=int(lengths.size),
            tokens=int(lengths.sum()),
            mean_length=float(lengths.mean()),
            median_length=float(median),
            p10_length=float(p10),
            p90_length=float(p90),
            segments_per_response=float(counts.mean()),
            median_segments_per_response=float(np.median(counts)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SegmentStats:
        """From `to_dict()` output, ignoring keys added beside it (e.g. the sample size)."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})

    def summary(self) -> str:
        return (
            f"{self.mean_length:.2f} tokens per segment (median {self.median_length:g}, "
            f"p10 {self.p10_length:g}, p90 {self.p90_length:g}), "
            f"{self.segments_per_response:.1f} segments per response, over {self.responses:,} responses"
        )

    def warning(self, granularity: str) -> str | None:
        """Why these segments are not phrase-like, for a segment-level RM; None when they are."""
        if granularity != "segment":
            return None
        if self.mean_length < TOKEN_LEVEL_MEAN_LENGTH:
            return (
                f"segments are near token level ({self.mean_length:.2f} tokens per segment, below "
                f"{TOKEN_LEVEL_MEAN_LENGTH}: words are split): raise --entropy-threshold, or use "
                "--entropy-threshold auto"
            )
        if self.segments_per_response < BANDIT_LEVEL_SEGMENTS:
            return (
                f"segments are near bandit level ({self.segments_per_response:.2f} segments per response, "
                f"below {BANDIT_LEVEL_SEGMENTS}): lower --entropy-threshold, or use --entropy-threshold auto"
            )
        return None


def segment_lengths(ends: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(length of every segment, number of segments of every row) from a `[B, T]` bool `ends`
    (`segment_rewards(...).ends`): a segment runs from the previous end + 1 to its end."""
    rows, cols = (x.numpy() for x in torch.nonzero(ends.detach().cpu(), as_tuple=True))
    previous = np.concatenate([[-1], cols[:-1]])
    first_of_row = np.concatenate([[True], rows[1:] != rows[:-1]]) if rows.size else rows.astype(bool)
    previous[first_of_row] = -1
    counts = np.bincount(rows, minlength=ends.shape[0])
    return cols - previous, counts


@dataclass
class Candidates:
    """The entropies at the positions that can end a segment besides each response's last one,
    with the totals `auto_threshold` needs."""

    entropy: np.ndarray  # float64, one per candidate position
    tokens: int  # tokens of the segmentable spans (a response that is only an EOS counts its one)
    responses: int

    @classmethod
    def merge(cls, parts: list[Candidates]) -> Candidates:
        entropy = np.concatenate([p.entropy for p in parts]) if parts else np.zeros(0)
        return cls(entropy, sum(p.tokens for p in parts), sum(p.responses for p in parts))


def candidate_entropies(
    entropy: torch.Tensor, response_mask: torch.Tensor, has_eos: torch.Tensor | None = None
) -> Candidates:
    """The entropies at positions `t < E` of every row (E = L-1-has_eos, DESIGN.md §3.1)."""
    lengths = response_mask.long().sum(-1)
    eos = torch.ones_like(lengths) if has_eos is None else has_eos.long()
    last = lengths - 1 - eos  # E
    positions = torch.arange(entropy.shape[1], device=entropy.device)
    candidate = positions[None, :] < last[:, None]
    present = lengths > 0
    spans = torch.where(last >= 0, last + 1, torch.ones_like(last))[present]
    return Candidates(
        entropy=entropy[candidate].detach().double().cpu().numpy(),
        tokens=int(spans.sum()),
        responses=int(present.sum()),
    )


@dataclass
class ThresholdChoice:
    """How `auto` chose τ: the target, the quantile of the candidate entropies, and the data."""

    threshold: float
    segment_length: float  # the target mean tokens per segment
    quantile: float  # share of the candidate positions at or below τ
    candidates: int
    responses: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "auto", **asdict(self)}


def auto_threshold(candidates: Candidates, segment_length: float) -> ThresholdChoice:
    """τ such that the candidates' responses average `segment_length` tokens per segment.

    With R responses of N segmentable tokens in all, a mean of ℓ needs N/ℓ segments: R last ones
    and N/ℓ - R at candidates whose entropy is above τ. τ is put midway between the entropies
    ranked c and c + 1 from the top (c that count), so the c highest are ends. A target longer than
    the responses themselves gives one segment per response (τ at the largest entropy); a target
    at or below 1 token gives every candidate (τ below the smallest).
    """
    if not segment_length > 0:
        raise ValueError(f"the target segment length must be positive, got {segment_length}")
    values = np.sort(candidates.entropy)[::-1]
    if values.size == 0:
        raise ValueError(
            "--entropy-threshold auto: no response in the sample has two tokens to segment between"
        )
    wanted = candidates.tokens / segment_length - candidates.responses
    count = int(np.clip(round(wanted), 0, values.size))
    if count == 0:
        threshold = float(values[0])
    elif count == values.size:
        threshold = float(values[-1]) / 2  # below every candidate (entropy is >= 0)
    else:
        threshold = float(values[count - 1] + values[count]) / 2
    # 0 and 1000 are the paper's sentinels for token and bandit (DESIGN.md §3.1): step off them.
    if threshold in (0.0, 1000.0):
        threshold = math.nextafter(threshold, math.inf)
    return ThresholdChoice(
        threshold=threshold,
        segment_length=float(segment_length),
        quantile=float(np.mean(values <= threshold)),
        candidates=int(values.size),
        responses=candidates.responses,
        tokens=candidates.tokens,
    )


__all__ = [
    "BANDIT_LEVEL_SEGMENTS",
    "Candidates",
    "DEFAULT_SEGMENT_LENGTH",
    "SegmentStats",
    "TOKEN_LEVEL_MEAN_LENGTH",
    "ThresholdChoice",
    "auto_threshold",
    "candidate_entropies",
    "segment_lengths",
]
