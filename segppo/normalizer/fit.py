"""Fitting the normalizer: collect `(p, r)` per segment, bin by p, fit the lines (DESIGN.md §3.3).

- `segment_points` / `PointCollector`: `(p, r)` for every segment of scored responses;
- `equal_count_bins`: the p = 1 points (one per response) as one bin, the others in bins of equal
  counts along ln p, so every bin holds enough points whatever the responses' lengths (segppo's);
- `bin_points`: group the points by p rounded to 3 decimals (the paper's);
- `fit_normalizer`: the mean and std lines against ln p, as a `Normalizer`: count-weighted least
  squares on equal-count bins (segppo's default, centred on the data) or the paper's unweighted
  Huber fit of its 3-decimal bins.

Why not the paper's bins everywhere: with responses of many segments nearly every p = k/K is its own
3-decimal bin. On SmolLM2 text (issue 20) 442 of 458 bins held fewer than 10 scores and were dropped,
so the fit used 17% of the points.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from segppo.kernels import segment_rewards

from .core import DEFAULT_SIGMA_FLOOR, Normalizer, check_floor

HUBER_EPSILON = 1.35
BIN_DECIMALS = 3
# Bins with fewer scores than this are left out of the fit: the std of a handful of samples is
# noisy and (with ddof=0) biased low, which would drag the std line down at small p.
DEFAULT_MIN_BIN_COUNT = 10
# Equal-count bins (fit_mode="weighted"): at most this many below p = 1. A line has two parameters;
# 50 bins show its shape, and with many points each bin's std is measured on many scores.
MAX_EQUAL_COUNT_BINS = 50
FIT_MODES = ("weighted", "paper")
DEFAULT_FIT_MODE = "weighted"
# Below this weighted R², a fitted line is replaced by a constant (fit_mode="weighted"). Low, since
# the bins' own sampling noise keeps R² below 1 for a right line; a line through noise has R² near 0.
DEFAULT_MIN_R2 = 0.2
# A last segment (p = 1) this many σ(1) off the line of the others gets a note: one line fitted to both
# tilts, and the normalized total of a response then drifts with its number of segments (0.6 σ off on
# responses of 1-12 segments: -0.46 at K = 1, +0.50 at K = 12; see last_segment_report).
LAST_SEGMENT_NOTE_OFFSET = 0.5
# A fit that uses less than this share of the points says so (a note and a DroppedPointsWarning).
MIN_USED_SHARE = 0.5


class PoorFitWarning(UserWarning):
    """A fitted line explains too little of the bins' variation; a global constant is used instead."""


class DroppedPointsWarning(UserWarning):
    """Most points are in bins too small to fit (the paper's 3-decimal bins on long responses)."""


# --------------------------------------------------------------------------------------------
# Collect


def segment_points(
    rm_values: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    granularity: str,
    threshold: float,
    has_eos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(p, r)` for every segment of every row, as 1-D float64 CPU tensors.

    Segment `k` of `K` (ends as in DESIGN.md §3.1) gives `p = k/K` and `r = rm_values` at its end.
    Points come row by row, segments in order; rows with `K = 0` (empty responses) give none.
    p is float64 so that rounding it to 3 decimals gives the same bins on every machine.
    """
    out = segment_rewards(
        rm_values,
        entropy,
        response_mask,
        granularity=granularity,
        threshold=threshold,
        has_eos=has_eos,
        normalizer=None,
        distribute="end",
    )
    ends = out.ends
    k = ends.long().cumsum(-1)  # at an end: its 1-based segment index
    num = out.num_segments[:, None].expand_as(k)
    p = k[ends].double() / num[ends].double()
    r = rm_values[ends].double()
    return p.cpu(), r.cpu()


class PointCollector:
    """Accumulates `(p, r)` points batch by batch; `arrays()` returns them as numpy float64.

    With several ranks, each rank collects its own share; the caller gathers every rank's
    `arrays()` (e.g. `torch.distributed.all_gather_object`) and merges them with
    `PointCollector().merge(parts)`.
    """

    def __init__(self, *, granularity: str = "segment", threshold: float = 2.0):
        self.granularity = granularity
        self.threshold = float(threshold)
        self._p: list[np.ndarray] = []
        self._r: list[np.ndarray] = []

    def add(self, p, r) -> None:
        """Append points given as tensors, arrays or sequences of equal length."""
        p, r = _as_float64(p), _as_float64(r)
        if p.ndim != 1 or p.shape != r.shape:
            raise ValueError(f"p and r must be 1-D and of equal length, got shapes {p.shape} and {r.shape}")
        self._p.append(p)
        self._r.append(r)

    def add_batch(
        self,
        rm_values: torch.Tensor,
        entropy: torch.Tensor,
        response_mask: torch.Tensor,
        has_eos: torch.Tensor | None = None,
    ) -> None:
        """Append the points of one scored batch (see `segment_points`)."""
        self.add(
            *segment_points(
                rm_values,
                entropy,
                response_mask,
                granularity=self.granularity,
                threshold=self.threshold,
                has_eos=has_eos,
            )
        )

    def merge(self, parts: Sequence[tuple[Any, Any]]) -> PointCollector:
        """Append other collections' `(p, r)` arrays, e.g. one per rank; returns self."""
        for p, r in parts:
            self.add(p, r)
        return self

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._p:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(self._p), np.concatenate(self._r)

    def __len__(self) -> int:
        return sum(len(p) for p in self._p)


def _as_float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Fit


def bin_points(p, r, *, decimals: int = BIN_DECIMALS) -> list[dict[str, Any]]:
    """Group `(p, r)` by p rounded to `decimals`; one dict per group, in increasing p.

    Each bin has `p` (the rounded key), `log_p` (the mean of ln p over its members: where the
    bin sits on the fit's x axis), `count`, and `mean`/`std` of its scores. `std` is the
    population std (ddof=0), so a bin of one score has std 0.

    `log_p` rather than ln(key): `E[r] = a·E[ln p] + c` holds exactly within a bin, while ln(key)
    is off by up to ln 2 at p ≈ 0.0015 and undefined for bins whose key rounds to 0 (p < 0.0005).
    """
    p, r = _as_float64(p), _as_float64(r)
    if p.size and not (np.all(p > 0) and np.all(p <= 1)):
        raise ValueError("every p must lie in (0, 1]")
    keys, group, count = np.unique(np.round(p, decimals), return_inverse=True, return_counts=True)
    log_p = np.bincount(group, weights=np.log(p)) / count
    mean = np.bincount(group, weights=r) / count
    std = np.sqrt(np.bincount(group, weights=(r - mean[group]) ** 2) / count)
    return [
        {
            "p": float(keys[i]),
            "log_p": float(log_p[i]),
            "count": int(count[i]),
            "mean": float(mean[i]),
            "std": float(std[i]),
            "used": True,
        }
        for i in range(len(keys))
    ]


def equal_count_bins(
    p, r, *, min_count: int = DEFAULT_MIN_BIN_COUNT, max_bins: int = MAX_EQUAL_COUNT_BINS
) -> list[dict[str, Any]]:
    """The points at p = 1 as one bin, the others in bins of about equal counts along ln p.

    Below p = 1, consecutive values of p are gathered into a bin until it holds at least
    `max(min_count, n / max_bins)` of the n points; points of equal p always share a bin (splitting
    them would split them by something else, e.g. their score). A remainder under `min_count` joins
    the bin before it, so every bin holds at least `min_count`; fewer than `min_count` points below
    p = 1 form one bin marked `used: False`. Bins have the keys of `bin_points`, `p` being
    `exp(log_p)` (1 for the p = 1 bin), and `p_min`/`p_max`, the range of their members.

    p = 1 has its own bin because it is a place of its own: every response has exactly one segment
    there, the one before its end, which an RM may score unlike the others.
    """
    p, r = _as_float64(p), _as_float64(r)
    if p.size and not (np.all(p > 0) and np.all(p <= 1)):
        raise ValueError("every p must lie in (0, 1]")
    last = p == 1.0
    order = np.lexsort((r, p))  # sums in one order, so that any order of the points gives equal bits
    p, r, last = p[order], r[order], last[order]
    rest_p, rest_r = p[~last], r[~last]
    values, which, counts = np.unique(rest_p, return_inverse=True, return_counts=True)
    target = max(min_count, -(-rest_p.size // max_bins))
    bin_of_value, filled, current = np.zeros(values.size, dtype=np.int64), 0, 0
    for i, count in enumerate(counts):
        bin_of_value[i] = current
        filled += count
        if filled >= target:
            current, filled = current + 1, 0
    if 0 < filled < min_count and current > 0:  # a short remainder joins the bin before it
        bin_of_value[bin_of_value == current] = current - 1
    groups = []
    if rest_p.size:
        member_bin = bin_of_value[which]
        enough = rest_p.size >= min_count
        groups += [(rest_p[member_bin == j], rest_r[member_bin == j], enough) for j in np.unique(member_bin)]
    if last.any():
        groups.append((p[last], r[last], True))
    bins = []
    for members_p, members_r, used in groups:
        log_p = float(np.log(members_p).mean())
        bins.append(
            {
                "p": 1.0 if members_p[0] == 1.0 else float(np.exp(log_p)),
                "log_p": log_p,
                "count": int(members_p.size),
                "mean": float(members_r.mean()),
                "std": float(members_r.std()),
                "used": bool(used),
                "p_min": float(members_p.min()),
                "p_max": float(members_p.max()),
            }
        )
    return bins


def huber_line(x, y, *, epsilon: float = HUBER_EPSILON) -> tuple[float, float, float]:
    """Fit `y ≈ slope·x + intercept` with a Huber loss; returns `(slope, intercept, R²)`.

    scikit-learn's `HuberRegressor` with `alpha=0`: its default `alpha=1e-4` is an L2 penalty on
    the slope, which would shrink the slope toward 0 by an amount that depends on the units of
    the RM's scores and on the number of bins. The paper's fit is an unpenalised Huber regression.
    R² is of the Huber line on the same points.
    """
    # Imported here: scikit-learn takes about a second to import and only fitting needs it.
    from sklearn.linear_model import HuberRegressor
    from sklearn.metrics import r2_score

    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(y, dtype=np.float64)
    model = HuberRegressor(epsilon=epsilon, alpha=0.0, max_iter=1000).fit(x, y)
    return float(model.coef_[0]), float(model.intercept_), float(r2_score(y, model.predict(x)))


def weighted_line(x, y, weights) -> tuple[float, float, float]:
    """Weighted least squares `y ≈ slope·x + intercept`; returns `(slope, intercept, weighted R²)`.

    With bins weighted by their counts this is the least-squares line through the points
    themselves (for the bins' means exactly), so its residuals sum to 0 over the points.
    """
    x, y, w = (np.asarray(v, dtype=np.float64) for v in (x, y, weights))
    x_mean, y_mean = np.average(x, weights=w), np.average(y, weights=w)
    spread = np.sum(w * (x - x_mean) ** 2)
    slope = float(np.sum(w * (x - x_mean) * (y - y_mean)) / spread) if spread > 0 else 0.0
    intercept = float(y_mean - slope * x_mean)
    total = np.sum(w * (y - y_mean) ** 2)
    residual = np.sum(w * (y - (slope * x + intercept)) ** 2)
    return slope, intercept, float(1 - residual / total) if total > 0 else 1.0


def fit_normalizer(
    p,
    r,
    *,
    fit_mode: str = DEFAULT_FIT_MODE,
    min_bin_count: int = DEFAULT_MIN_BIN_COUNT,
    min_r2: float = DEFAULT_MIN_R2,
    sigma_floor: float = DEFAULT_SIGMA_FLOOR,
    epsilon: float = HUBER_EPSILON,
    granularity: str | None = None,
    threshold: float | None = None,
    reward_model: str | None = None,
    dataset: str | None = None,
) -> Normalizer:
    """Fit `[a, b, c, d]` to segment scores `r` at positions `p` (DESIGN.md §3.3).

    The bins' means are fitted against their ln p for `(a, c)`, the bins' population stds (ddof=0)
    for `(b, d)`, separately, with R² of each fit on the bins used. `fit_mode`:

    - `"weighted"` (segppo's default): equal-count bins (`equal_count_bins`, each of at least
      `min_bin_count` points, so every point is used), fitted by least squares with each bin
      weighted by its count, i.e. every score counts once. The normalized rewards then average
      about 0 over the fit data. A line whose weighted R² is below `min_r2` explains too little to
      trust: it is replaced by the constant of all the points (their mean; their std around the
      mean line), with a note and a `PoorFitWarning`.
    - `"paper"`: the paper's fit: bins of p rounded to 3 decimals (`bin_points`), those with fewer
      than `min_bin_count` scores left out, and an unweighted Huber regression on the rest: a bin of
      10 scores counts as much as the p = 1 bin, which holds one score of every response, so with
      short responses the lines can miss the most populated bins.

    Bins left out are kept in `bins` with `used: False`; `points_used` counts the points of the
    bins used, and a fit that uses less than half of them says so (a note, `DroppedPointsWarning`).
    `last_segment` compares the p = 1 bin with the others (`last_segment_report`).

    `mean_response_sum` records the mean over responses of the summed normalized rewards of
    their segments on the fit data (each response has one segment at p = 1).

    With fewer than 2 bins left (a bandit RM, where every p = 1, or too few scores) there is no
    slope to fit: the result is the bandit normalizer `[0, 0, mean, std]` of all scores, with
    `source="bandit"` and a note saying why. A std line that drops below `sigma_floor` for a p the
    data can hold (p >= 1/K of the longest response) is recorded in `floor_warning` and emitted
    as a `StdFloorWarning`.
    """
    if fit_mode not in FIT_MODES:
        raise ValueError(f"fit_mode must be one of {FIT_MODES}, got {fit_mode!r}")
    p, r = _as_float64(p), _as_float64(r)
    if p.size == 0:
        raise ValueError("no (p, r) points to fit: score some responses first")
    if p.shape != r.shape:
        raise ValueError(f"p and r must have equal shapes, got {p.shape} and {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("the scores r contain NaN or inf")
    if fit_mode == "paper":
        bins = bin_points(p, r)
        for b in bins:
            b["used"] = b["count"] >= min_bin_count
    else:
        bins = equal_count_bins(p, r, min_count=min_bin_count)
    used = [b for b in bins if b["used"]]
    dropped = [b for b in bins if not b["used"]]
    points_used = sum(b["count"] for b in used)
    score_mean, score_std = float(r.mean()), float(r.std())  # population std, like the bins'

    notes = []
    if dropped:
        notes.append(
            f"{len(dropped)} of {len(bins)} bins have fewer than {min_bin_count} scores and were "
            f"left out of the fit (p = {_list_preview([b['p'] for b in dropped])})"
        )
    if points_used < MIN_USED_SHARE * p.size:
        message = (
            f"the fit used {points_used:,} of the points ({points_used / p.size:.0%} of {p.size:,}): "
            "most are in bins too small to fit"
            + (" (the paper's 3-decimal bins; the default fit mode bins every point)" if dropped else "")
        )
        notes.append(message)
        warnings.warn(message, DroppedPointsWarning, stacklevel=2)
    if len(used) < 2:
        params = (0.0, 0.0, score_mean, score_std)
        r2_mean = r2_std = None
        source = "bandit"
        notes.append(
            f"only {len(used)} bin(s) with at least {min_bin_count} scores, so there is no slope "
            "to fit; using the bandit normalizer [0, 0, mean, std] of all scores"
        )
    elif fit_mode == "paper":
        x = [b["log_p"] for b in used]
        a, c, r2_mean = huber_line(x, [b["mean"] for b in used], epsilon=epsilon)
        b_, d, r2_std = huber_line(x, [b["std"] for b in used], epsilon=epsilon)
        params = (a, b_, c, d)
        source = "fit"
    else:
        params, r2_mean, r2_std = _weighted_fit(used, p, r, min_r2, notes)
        source = "fit"

    normalizer = Normalizer(
        params=params,
        sigma_floor=sigma_floor,
        source=source,
        fit_mode=fit_mode,
        granularity=granularity,
        threshold=threshold,
        reward_model=reward_model,
        dataset=dataset,
        num_samples=int(p.size),
        num_responses=int(np.count_nonzero(p == 1.0)),
        max_segments=int(round(1 / p.min())),
        score_mean=score_mean,
        score_std=score_std,
        r2_mean=r2_mean,
        r2_std=r2_std,
        min_bin_count=min_bin_count,
        points_used=points_used,
        bins=bins,
        notes=notes,
    )
    if normalizer.num_responses:
        normalizer.mean_response_sum = float(normalizer.apply(r, p).sum() / normalizer.num_responses)
    normalizer.last_segment = last_segment_report(p, r, normalizer)
    offset = (normalizer.last_segment or {}).get("offset", 0.0)
    if abs(offset) >= LAST_SEGMENT_NOTE_OFFSET:
        normalizer.notes.append(
            f"the last segment (p = 1) scores {offset:+.2f} σ off the line of the other segments: one line "
            f"for both gives responses of more segments a {'higher' if offset < 0 else 'lower'} total "
            "normalized reward"
        )
    return check_floor(normalizer)


def last_segment_report(p, r, normalizer: Normalizer) -> dict[str, Any] | None:
    """How the segments before EOS (p = 1, one per response) score against the others.

    `offset` is the p = 1 scores' mean minus the value at p = 1 of a count-weighted line fitted to
    the other segments alone, in units of the fitted σ(1): how far the last segment sits off the
    trend of the rest. `mean_normalized` is the mean normalized reward of the p = 1 segments under
    the fit, `others_mean_normalized` that of the other segments. None without both kinds of points.
    """
    last = p == 1.0
    if not last.any() or last.all():
        return None
    others = equal_count_bins(p[~last], r[~last], min_count=1)
    x = np.array([b["log_p"] for b in others])
    counts = np.array([b["count"] for b in others])
    slope, intercept, _ = weighted_line(x, [b["mean"] for b in others], counts)
    normalized = normalizer.apply(r, p)
    sigma_1 = float(normalizer.std(1.0))
    return {
        "count": int(last.sum()),
        "mean": float(r[last].mean()),
        "std": float(r[last].std()),
        "others_line_at_1": float(intercept),
        "offset": float((r[last].mean() - intercept) / sigma_1),
        "mean_normalized": float(normalized[last].mean()),
        "others_mean_normalized": float(normalized[~last].mean()),
    }


def _weighted_fit(used: list[dict[str, Any]], p: np.ndarray, r: np.ndarray, min_r2: float, notes: list[str]):
    """`fit_mode="weighted"`: count-weighted lines, each replaced by a constant when its R² is poor.

    The constants are those of all the points: their mean, and their std around the mean line.
    """
    x, counts = np.array([b["log_p"] for b in used]), np.array([b["count"] for b in used])
    means, stds = np.array([b["mean"] for b in used]), np.array([b["std"] for b in used])
    a, c, r2_mean = weighted_line(x, means, counts)
    b_, d, r2_std = weighted_line(x, stds, counts)
    poor = []
    if r2_mean < min_r2:
        a, c = 0.0, float(r.mean())
        poor.append(f"mean line (R² = {r2_mean:.3f}): using the global mean {c:.4g}")
    if r2_std < min_r2:
        b_, d = 0.0, float(np.sqrt(np.mean((r - (a * np.log(p) + c)) ** 2)))
        poor.append(f"std line (R² = {r2_std:.3f}): using the global std {d:.4g} around the mean line")
    if poor:
        message = f"R² below min_r2={min_r2:g} for the " + "; for the ".join(poor)
        notes.append(message)
        warnings.warn(message, PoorFitWarning, stacklevel=3)
    return (a, b_, c, d), r2_mean, r2_std


def _list_preview(values: Sequence[float], limit: int = 6) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")
