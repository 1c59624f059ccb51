"""Fitting the normalizer: collect `(p, r)` per segment, bin by p, Huber-fit the lines (DESIGN.md §3.3).

- `segment_points` / `PointCollector`: `(p, r)` for every segment of scored responses;
- `bin_points`: group the points by p rounded to 3 decimals;
- `fit_normalizer`: the mean and std lines against ln p, as a `Normalizer`.
"""

from __future__ import annotations

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


def fit_normalizer(
    p,
    r,
    *,
    min_bin_count: int = DEFAULT_MIN_BIN_COUNT,
    sigma_floor: float = DEFAULT_SIGMA_FLOOR,
    epsilon: float = HUBER_EPSILON,
    granularity: str | None = None,
    threshold: float | None = None,
    reward_model: str | None = None,
    dataset: str | None = None,
) -> Normalizer:
    """Fit `[a, b, c, d]` to segment scores `r` at positions `p` (DESIGN.md §3.3).

    Points are binned by p rounded to 3 decimals (`bin_points`); bins with fewer than
    `min_bin_count` scores are kept in `bins` with `used: False` and left out of the fit. The
    bins' means are Huber-fitted against their ln p for `(a, c)`, the bins' population stds
    (ddof=0) for `(b, d)`, separately, with R² of each fit on the bins used.

    With fewer than 2 bins left (a bandit RM, where every p = 1, or too few scores) there is no
    slope to fit: the result is the bandit normalizer `[0, 0, mean, std]` of all scores, with
    `source="bandit"` and a note saying why. A std line that drops below `sigma_floor` for some
    p ≥ 1/2048 is recorded in `floor_warning` and emitted as a `StdFloorWarning`.
    """
    p, r = _as_float64(p), _as_float64(r)
    if p.size == 0:
        raise ValueError("no (p, r) points to fit: score some responses first")
    if p.shape != r.shape:
        raise ValueError(f"p and r must have equal shapes, got {p.shape} and {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("the scores r contain NaN or inf")
    bins = bin_points(p, r)
    for b in bins:
        b["used"] = b["count"] >= min_bin_count
    used = [b for b in bins if b["used"]]
    dropped = [b for b in bins if not b["used"]]
    score_mean, score_std = float(r.mean()), float(r.std())  # population std, like the bins'

    notes = []
    if dropped:
        notes.append(
            f"{len(dropped)} of {len(bins)} bins have fewer than {min_bin_count} scores and were "
            f"left out of the fit (p = {_list_preview([b['p'] for b in dropped])})"
        )
    if len(used) < 2:
        params = (0.0, 0.0, score_mean, score_std)
        r2_mean = r2_std = None
        source = "bandit"
        notes.append(
            f"only {len(used)} bin(s) with at least {min_bin_count} scores, so there is no slope "
            "to fit; using the bandit normalizer [0, 0, mean, std] of all scores"
        )
    else:
        x = [b["log_p"] for b in used]
        a, c, r2_mean = huber_line(x, [b["mean"] for b in used], epsilon=epsilon)
        b_, d, r2_std = huber_line(x, [b["std"] for b in used], epsilon=epsilon)
        params = (a, b_, c, d)
        source = "fit"

    normalizer = Normalizer(
        params=params,
        sigma_floor=sigma_floor,
        source=source,
        granularity=granularity,
        threshold=threshold,
        reward_model=reward_model,
        dataset=dataset,
        num_samples=int(p.size),
        num_responses=int(np.count_nonzero(p == 1.0)),
        score_mean=score_mean,
        score_std=score_std,
        r2_mean=r2_mean,
        r2_std=r2_std,
        min_bin_count=min_bin_count,
        bins=bins,
        notes=notes,
    )
    return check_floor(normalizer)


def _list_preview(values: Sequence[float], limit: int = 6) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")
