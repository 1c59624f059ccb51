"""Statistics of an evaluation: means with confidence intervals, and win rates with ties.

Both take an optional `groups` (one label per value, e.g. the prompt index). With several
samples per prompt, the samples of one prompt are not independent draws of the prompt
distribution, so the standard error is the cluster-robust one over groups:

    se² = G/(G−1) · Σ_g (Σ_{i∈g} (x_i − x̄))² / n²

which for groups of equal size m is the variance of the G group means over G. Without groups
(or with one value per group) it is the usual `s / √n` with the sample standard deviation `s`.
The 95% interval is the normal approximation `mean ± 1.96·se`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class MeanCI:
    """Mean of `n` values with its standard error and normal-approximation confidence interval."""

    mean: float
    std: float  # sample standard deviation (ddof=1); NaN for n < 2
    se: float  # NaN when it cannot be estimated (n < 2, or a single group)
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return {
            "mean": _finite(self.mean),
            "std": _finite(self.std),
            "se": _finite(self.se),
            "ci95": [_finite(self.low), _finite(self.high)],
            "n": self.n,
        }


@dataclass(frozen=True)
class WinRate:
    """Pairwise win rate of a policy against a baseline on the same items (ties count half)."""

    rate: float
    se: float
    wins: int
    ties: int
    losses: int
    n: int

    @property
    def low(self) -> float:
        return self.rate - Z95 * self.se

    @property
    def high(self) -> float:
        return self.rate + Z95 * self.se

    def to_dict(self) -> dict:
        return {
            "rate": _finite(self.rate),
            "se": _finite(self.se),
            "ci95": [_finite(self.low), _finite(self.high)],
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "n": self.n,
        }


def _finite(x: float) -> float | None:
    """JSON has no NaN: None stands for a statistic that cannot be estimated."""
    return float(x) if math.isfinite(x) else None


def _values(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("no values to summarise")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite numbers")
    return x


def clustered_se(values: Sequence[float], groups: Sequence | None = None) -> float:
    """Standard error of the mean of `values`, cluster-robust over `groups` (see module doc)."""
    x = _values(values)
    n = x.size
    if groups is None:
        return float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    labels = np.asarray(groups)
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} group labels for {n} values")
    _, index = np.unique(labels, return_inverse=True)
    num_groups = int(index.max()) + 1
    if num_groups < 2:
        return math.nan
    sums = np.bincount(index, weights=x - x.mean(), minlength=num_groups)
    return float(math.sqrt(num_groups / (num_groups - 1) * (sums**2).sum()) / n)


def mean_ci(values: Sequence[float], groups: Sequence | None = None, z: float = Z95) -> MeanCI:
    """Mean with a normal-approximation confidence interval `mean ± z·se` (z = 1.96: 95%)."""
    x = _values(values)
    mean = float(x.mean())
    se = clustered_se(x, groups)
    std = float(x.std(ddof=1)) if x.size > 1 else math.nan
    return MeanCI(mean=mean, std=std, se=se, low=mean - z * se, high=mean + z * se, n=int(x.size))


def win_outcomes(
    scores: Sequence[float], baseline: Sequence[float], same: Sequence[bool] | None = None
) -> np.ndarray:
    """1 where `scores` beats `baseline`, 0.5 on a tie, 0 on a loss, item by item.

    `same[i]` true forces a tie: two identical responses are equally good whatever tiny
    floating-point differences their scores picked up from being scored in different batches.
    """
    a, b = _values(scores), _values(baseline)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} scores against {b.size} baseline scores: they must be paired")
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    if same is not None:
        same = np.asarray(same, dtype=bool)
        if same.shape != a.shape:
            raise ValueError(f"{same.size} `same` flags for {a.size} pairs")
        outcome = np.where(same, 0.5, outcome)
    return outcome


def win_rate(
    scores: Sequence[float],
    baseline: Sequence[float],
    groups: Sequence | None = None,
    same: Sequence[bool] | None = None,
) -> WinRate:
    """Win rate of `scores` over `baseline`, paired item by item, ties counted half.

    The standard error is that of the mean outcome (cluster-robust over `groups`).
    """
    outcome = win_outcomes(scores, baseline, same)
    return WinRate(
        rate=float(outcome.mean()),
        se=clustered_se(outcome, groups),
        wins=int((outcome == 1.0).sum()),
        ties=int((outcome == 0.5).sum()),
        losses=int((outcome == 0.0).sum()),
        n=int(outcome.size),
    )
