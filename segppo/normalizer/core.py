"""The location-aware normalizer itself (DESIGN.md §3.3): its parameters, record and std floor.

`μ(p) = a·ln p + c` and `σ(p) = max(b·ln p + d, σ_floor)` at relative position `p = k/K`; PPO uses
`(r - μ(p)) / σ(p)`. Parameters are `[a, b, c, d]`, the order of the paper's `param.json`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCES = ("fit", "param.json", "bandit")
DEFAULT_SIGMA_FLOOR = 1e-2
# The smallest p the floor check looks at when the data's longest response is unknown (an
# imported fit): the first segment of a 2048-segment response.
FLOOR_CHECK_MIN_P = 1 / 2048


class StdFloorWarning(UserWarning):
    """The fitted std line b·ln p + d falls below σ_floor somewhere in the p that can occur."""


@dataclass
class Normalizer:
    """A location-aware normalizer `[a, b, c, d]` and the record of where it came from.

    `num_samples` is the number of `(p, r)` points (scored segments) the fit saw and
    `num_responses` the number of responses (each has exactly one segment at p = 1).
    `fit_mode`, `max_segments` and `mean_response_sum`: see `segppo.normalizer.fit.fit_normalizer`.
    `bins`: `{p, log_p, count, mean, std, used}` per p bin of the fit; `points_used` the points in
    the bins used; `last_segment` the p = 1 segments against the others
    (`segppo.normalizer.fit.last_segment_report`). `notes`: what the fit
    wants the user to know (dropped bins, a degenerate fit). `extra`: keys of a loaded file that
    this version does not know, written back by `save`.
    """

    params: tuple[float, float, float, float]
    sigma_floor: float = DEFAULT_SIGMA_FLOOR
    source: str = "fit"
    fit_mode: str | None = None  # "weighted" | "paper" for fits (segppo.normalizer.fit)
    granularity: str | None = None
    threshold: float | None = None
    reward_model: str | None = None
    dataset: str | None = None
    num_samples: int | None = None
    num_responses: int | None = None
    max_segments: int | None = None  # K of the fit data's longest response: the floor check's range
    mean_response_sum: float | None = None  # mean over fit responses of their summed normalized rewards
    score_mean: float | None = None
    score_std: float | None = None
    r2_mean: float | None = None
    r2_std: float | None = None
    min_bin_count: int | None = None
    points_used: int | None = None  # points in the bins the fit used (of num_samples)
    last_segment: dict[str, Any] | None = None  # the p = 1 segments against the others (fit.py)
    bins: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    floor_warning: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.params = _check_params(self.params)
        _check_sigma_floor(self.sigma_floor)
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")

    # --- applying

    def mean(self, p):
        """μ(p) = a·ln p + c, elementwise on a tensor, array or number."""
        a, _, c, _ = self.params
        return a * _log(p) + c

    def std(self, p):
        """σ(p) = max(b·ln p + d, σ_floor), elementwise."""
        _, b, _, d = self.params
        line = b * _log(p) + d
        if isinstance(line, torch.Tensor):
            return line.clamp(min=self.sigma_floor)
        return np.maximum(line, self.sigma_floor)

    def apply(self, raw, p):
        """The normalized reward `(raw - μ(p)) / σ(p)`, elementwise (DESIGN.md §3.3)."""
        if isinstance(raw, torch.Tensor) and not isinstance(p, torch.Tensor):
            p = torch.as_tensor(p, device=raw.device)
        return (raw - self.mean(p)) / self.std(p)

    def fits(self, granularity: str | None, threshold: float | None) -> bool:
        """Whether this was fitted on the segments of a reward model of `granularity` (and, for
        segments, entropy `threshold`); one that records no granularity (made by hand) fits any."""
        if self.granularity is None or granularity is None:
            return True
        return self.granularity == granularity and (granularity != "segment" or self.threshold == threshold)

    def as_kernel_params(self) -> tuple[float, float, float, float]:
        """`(a, b, c, d)` for `segment_rewards(normalizer=..., sigma_floor=self.sigma_floor)`."""
        return self.params

    @property
    def num_bins_used(self) -> int:
        return sum(1 for b in self.bins if b.get("used", True))

    @property
    def num_bins_dropped(self) -> int:
        return len(self.bins) - self.num_bins_used

    # --- serialising

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `normalizer.json` (also what `segppo.json` stores as `normalizer`)."""
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        known["params"] = list(self.params)
        return {**self.extra, **known}

    @classmethod
    def from_dict(cls, values: Any, where: str = "normalizer") -> Normalizer:
        """Build from a JSON object; errors name `where` (a file) and the field.

        Unknown keys are kept in `extra`.
        """
        if not isinstance(values, dict):
            raise ValueError(f"{where}: must be a JSON object, got {type(values).__name__}")
        if "params" not in values:
            raise ValueError(f"{where}: field 'params' is missing (expected [a, b, c, d])")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        for name in ("threshold", "score_mean", "score_std", "r2_mean", "r2_std", "mean_response_sum"):
            _check_field(where, name, known.get(name), is_number(known.get(name)), "a number or null")
        for name in ("num_samples", "num_responses", "max_segments", "min_bin_count", "points_used"):
            value = known.get(name)
            _check_field(
                where,
                name,
                value,
                isinstance(value, int) and not isinstance(value, bool),
                "an integer or null",
            )
        for name in ("fit_mode", "granularity", "reward_model", "dataset", "floor_warning"):
            _check_field(where, name, known.get(name), isinstance(known.get(name), str), "a string or null")
        for name in ("bins", "notes"):
            _check_field(where, name, known.get(name), isinstance(known.get(name), list), "a list")
        value = known.get("last_segment")
        _check_field(where, "last_segment", value, isinstance(value, dict), "an object or null")
        try:
            return cls(**known, extra=extra)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def save(self, path: str | os.PathLike) -> Path:
        """Write `normalizer.json` atomically; see `segppo.normalizer.files.save_normalizer`."""
        from .files import save_normalizer

        return save_normalizer(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Normalizer:
        """Read and validate a `normalizer.json` (or a folder holding one)."""
        from .files import load_normalizer

        return load_normalizer(path)


def _log(p):
    if isinstance(p, torch.Tensor):
        return torch.log(p if p.is_floating_point() else p.double())
    return np.log(np.asarray(p, dtype=np.float64))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_field(where: str, name: str, value: Any, ok: bool, expected: str) -> None:
    if value is not None and not ok:
        raise ValueError(f"{where}: field {name!r} must be {expected}, got {value!r}")


def _check_params(params: Any) -> tuple[float, float, float, float]:
    if isinstance(params, torch.Tensor):
        params = params.detach().flatten().tolist()
    if not isinstance(params, (list, tuple)) or len(params) != 4 or not all(is_number(x) for x in params):
        raise ValueError(f"field 'params' must be 4 finite numbers [a, b, c, d], got {params!r}")
    return tuple(float(x) for x in params)


def _check_sigma_floor(sigma_floor: Any) -> None:
    if not (is_number(sigma_floor) and sigma_floor > 0):
        raise ValueError(f"field 'sigma_floor' must be a positive finite number, got {sigma_floor!r}")


@dataclass(frozen=True)
class FloorViolation:
    """Where `b·ln p + d < σ_floor` within `[min_p, 1]`: p from `p_low` to `p_high`.

    `min_segments`: responses with at least this many segments have a floored segment
    (1 when the violation reaches p = 1, which every response has).
    """

    p_low: float
    p_high: float
    min_segments: int
    sigma_floor: float

    @property
    def message(self) -> str:
        who = (
            "every response's segments near its end"
            if self.min_segments == 1
            else f"the first segments of responses with K >= {self.min_segments} segments"
        )
        return (
            f"the fitted std b·ln p + d falls below sigma_floor={self.sigma_floor:g} for p in "
            f"[{self.p_low:.4g}, {self.p_high:.4g}] ({who}); sigma is floored there"
        )


def std_floor_violations(
    params: Sequence[float], sigma_floor: float = DEFAULT_SIGMA_FLOOR, min_p: float = FLOOR_CHECK_MIN_P
) -> FloorViolation | None:
    """Where in `p ∈ [min_p, 1]` the std line `b·ln p + d` is below `sigma_floor`; None if nowhere.

    The line is linear in ln p, so the violation is one interval ending at min_p (b > 0: the std
    shrinks toward small p, i.e. the start of long responses; the paper's token-level fit) or at
    1 (b < 0), cut where `ln p* = (σ_floor - d) / b`.
    """
    _, b, _, d = (float(x) for x in params)
    log_min = math.log(min_p)
    if b == 0:
        return FloorViolation(min_p, 1.0, 1, sigma_floor) if d < sigma_floor else None
    log_cross = (sigma_floor - d) / b
    if b > 0:  # below the floor for ln p < log_cross
        if log_cross <= log_min:
            return None
        p_cross = math.exp(min(log_cross, 0.0))
        # A response of K segments has p = 1/K at its first one: floored when 1/K < p*.
        min_segments = 1 if log_cross > 0 else math.floor(1 / p_cross) + 1
        return FloorViolation(min_p, p_cross, min_segments, sigma_floor)
    if log_cross >= 0:  # b < 0: below the floor for ln p > log_cross
        return None
    return FloorViolation(math.exp(max(log_cross, log_min)), 1.0, 1, sigma_floor)


def check_floor(normalizer: Normalizer) -> Normalizer:
    """Record (and emit) the floor warning of `normalizer`; returns it.

    Only the p that the fit data can hold are checked: down to 1/K of its longest response
    (`max_segments`), or to `FLOOR_CHECK_MIN_P` when that is unknown (an imported fit).
    """
    min_p = 1 / normalizer.max_segments if normalizer.max_segments else FLOOR_CHECK_MIN_P
    violation = std_floor_violations(normalizer.params, normalizer.sigma_floor, min_p)
    normalizer.floor_warning = violation.message if violation else None
    if violation:
        warnings.warn(violation.message, StdFloorWarning, stacklevel=3)
    return normalizer
