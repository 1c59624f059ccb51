"""The location-aware normalizer (DESIGN.md §3.3): collect, fit, save/load, apply, import, render.

A segment-level reward model's raw score at segment `k` of `K` drifts with its relative position
`p = k/K`. The normalizer models that drift as `μ(p) = a·ln p + c` and `σ(p) = max(b·ln p + d, σ_floor)`
and PPO uses `(r - μ(p)) / σ(p)`. Parameters are `[a, b, c, d]`, the order of the paper's
`param.json` (mean slope, std slope, mean intercept, std intercept).

The pieces, in the order a fit uses them:

- `segment_points` / `PointCollector`: `(p, r)` for every segment of scored responses;
- `fit_normalizer`: bin by `p`, Huber-fit the bins' means and stds against `ln p`;
- `Normalizer`: the fitted (or imported) parameters with the record of where they came from,
  `save`/`load` as `normalizer.json`, and `mean`/`std`/`apply` on tensors;
- `std_floor_violations`: where the fitted std line drops below `σ_floor`;
- `import_param_json` / `param_json_keys`: the paper's released parameters;
- `fit_table`, `curve_sketch`, `save_plot`: what the CLI shows.

scikit-learn is needed only by `fit_normalizer` and matplotlib only by `save_plot`; both are
imported there, so PPO can load and apply a normalizer without them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from segppo.io import atomic_write_text
from segppo.kernels import resolve_granularity, segment_rewards

NORMALIZER_FILE = "normalizer.json"
SOURCES = ("fit", "param.json", "bandit")
DEFAULT_SIGMA_FLOOR = 1e-2
HUBER_EPSILON = 1.35
BIN_DECIMALS = 3
# Bins with fewer scores than this are left out of the fit: the std of a handful of samples is
# noisy and (with ddof=0) biased low, which would drag the std line down at small p.
DEFAULT_MIN_BIN_COUNT = 10
# The smallest p the floor check looks at: the first segment of a 2048-segment response.
FLOOR_CHECK_MIN_P = 1 / 2048
# Level names of the paper's param.json, outermost first; used in error messages.
PARAM_JSON_LEVELS = ("model", "dataset", "method", "agg", "threshold")


class StdFloorWarning(UserWarning):
    """The fitted std line b·ln p + d falls below σ_floor somewhere in p ∈ [1/2048, 1]."""


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
    try:
        from sklearn.linear_model import HuberRegressor
        from sklearn.metrics import r2_score
    except ImportError as e:  # scikit-learn is needed for fitting only
        raise ImportError("fitting a normalizer needs scikit-learn: pip install scikit-learn") from e
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
    return _check_floor(normalizer)


def _list_preview(values: Sequence[float], limit: int = 6) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


# --------------------------------------------------------------------------------------------
# Std floor


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


def _check_floor(normalizer: Normalizer) -> Normalizer:
    """Record (and emit) the floor warning of `normalizer`; returns it."""
    violation = std_floor_violations(normalizer.params, normalizer.sigma_floor)
    normalizer.floor_warning = violation.message if violation else None
    if violation:
        warnings.warn(violation.message, StdFloorWarning, stacklevel=3)
    return normalizer


# --------------------------------------------------------------------------------------------
# The normalizer and its file


@dataclass
class Normalizer:
    """A location-aware normalizer `[a, b, c, d]` and the record of where it came from.

    `num_samples` is the number of `(p, r)` points (scored segments) the fit saw and
    `num_responses` the number of responses (each has exactly one segment at p = 1).
    `bins`: `{p, log_p, count, mean, std, used}` per p bin of the fit. `notes`: what the fit
    wants the user to know (dropped bins, a degenerate fit). `extra`: keys of a loaded file that
    this version does not know, written back by `save`.
    """

    params: tuple[float, float, float, float]
    sigma_floor: float = DEFAULT_SIGMA_FLOOR
    source: str = "fit"
    granularity: str | None = None
    threshold: float | None = None
    reward_model: str | None = None
    dataset: str | None = None
    num_samples: int | None = None
    num_responses: int | None = None
    score_mean: float | None = None
    score_std: float | None = None
    r2_mean: float | None = None
    r2_std: float | None = None
    min_bin_count: int | None = None
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

    def to_json(self) -> str:
        """JSON text; a ValueError for values JSON cannot hold (NaN, inf, objects)."""
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise ValueError(f"normalizer is not JSON-serialisable: {e}") from e

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
        for name in ("threshold", "score_mean", "score_std", "r2_mean", "r2_std"):
            _check_field(where, name, known.get(name), _is_number(known.get(name)), "a number or null")
        for name in ("num_samples", "num_responses", "min_bin_count"):
            value = known.get(name)
            _check_field(
                where,
                name,
                value,
                isinstance(value, int) and not isinstance(value, bool),
                "an integer or null",
            )
        for name in ("granularity", "reward_model", "dataset", "floor_warning"):
            _check_field(where, name, known.get(name), isinstance(known.get(name), str), "a string or null")
        for name in ("bins", "notes"):
            _check_field(where, name, known.get(name), isinstance(known.get(name), list), "a list")
        try:
            return cls(**known, extra=extra)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def save(self, path: str | os.PathLike) -> Path:
        """Write `normalizer.json` atomically (a folder path gets `normalizer.json` inside); returns the file.

        The JSON text is made before anything is written, and the file goes to a temporary
        sibling renamed over the target, so a failure leaves any previous file untouched.
        """
        path = _normalizer_path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Normalizer:
        """Read and validate a `normalizer.json` (or a folder holding one)."""
        path = _normalizer_path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(values, where=str(path))


def _normalizer_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / NORMALIZER_FILE if path.is_dir() else path


def _log(p):
    if isinstance(p, torch.Tensor):
        return torch.log(p if p.is_floating_point() else p.double())
    return np.log(np.asarray(p, dtype=np.float64))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_field(where: str, name: str, value: Any, ok: bool, expected: str) -> None:
    if value is not None and not ok:
        raise ValueError(f"{where}: field {name!r} must be {expected}, got {value!r}")


def _check_params(params: Any) -> tuple[float, float, float, float]:
    if isinstance(params, torch.Tensor):
        params = params.detach().flatten().tolist()
    if not isinstance(params, (list, tuple)) or len(params) != 4 or not all(_is_number(x) for x in params):
        raise ValueError(f"field 'params' must be 4 finite numbers [a, b, c, d], got {params!r}")
    return tuple(float(x) for x in params)


def _check_sigma_floor(sigma_floor: Any) -> None:
    if not (_is_number(sigma_floor) and sigma_floor > 0):
        raise ValueError(f"field 'sigma_floor' must be a positive finite number, got {sigma_floor!r}")


# --------------------------------------------------------------------------------------------
# The paper's param.json


def import_param_json(
    path: str | os.PathLike, key: str | Sequence[str], *, sigma_floor: float = DEFAULT_SIGMA_FLOOR
) -> Normalizer:
    """The normalizer stored in the paper's `param.json` under `key`.

    The file nests `model → dataset → method → agg → threshold → [a, b, c, d]`; `key` is the path
    through it, "/"-separated ("phi3-instruct/preference700k_60000/peak/avg/1.75") or a list. A
    numeric level matches numerically ("2" finds "2.0"). A missing level is a ValueError naming it
    and listing the keys available there.
    """
    path = Path(path)
    parts = [str(k) for k in (key.split("/") if isinstance(key, str) else key)]
    node = _read_json(path)
    walked: list[str] = []
    for part in parts:
        level = _level_name(len(walked))
        if not isinstance(node, dict):
            raise ValueError(
                f"{path}: key {'/'.join(parts)!r} is too long: {'/'.join(walked)!r} is already a leaf"
            )
        found = _find_key(node, part)
        if found is None:
            where = f" under {'/'.join(walked)!r}" if walked else ""
            raise ValueError(f"{path}: no {level} {part!r}{where}; available: {', '.join(map(str, node))}")
        walked.append(found)
        node = node[found]
    if isinstance(node, dict):
        raise ValueError(
            f"{path}: key {'/'.join(walked)!r} stops at the {_level_name(len(walked))} level; "
            f"continue with one of: {', '.join(map(str, node))}"
        )
    if not (isinstance(node, list) and len(node) == 4 and all(_is_number(x) for x in node)):
        raise ValueError(
            f"{path}: {'/'.join(walked)!r} must hold 4 finite numbers [a, b, c, d], got {node!r}"
        )

    # Names for the record only when the key has the paper's five levels.
    named = dict(zip(PARAM_JSON_LEVELS, walked, strict=True)) if len(walked) == len(PARAM_JSON_LEVELS) else {}
    threshold = _as_float(named.get("threshold"))
    granularity = None
    if threshold is not None and threshold >= 0:  # the paper's 0 and 1000 mean token and bandit
        granularity = resolve_granularity("segment", threshold)
    normalizer = Normalizer(
        params=tuple(node),
        sigma_floor=sigma_floor,
        source="param.json",
        granularity=granularity,
        threshold=threshold,
        reward_model=named.get("model"),
        dataset=named.get("dataset"),
        notes=[f"imported from {path.name}, key {'/'.join(walked)}"],
    )
    return _check_floor(normalizer)


def param_json_keys(path: str | os.PathLike) -> list[str]:
    """Every full key path of a `param.json` ("model/dataset/method/agg/threshold"), in file order."""

    def walk(node, prefix: list[str]):
        if not isinstance(node, dict):
            yield "/".join(prefix)
            return
        for k, child in node.items():
            yield from walk(child, [*prefix, str(k)])

    return list(walk(_read_json(Path(path)), []))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _find_key(node: dict, part: str) -> str | None:
    """The key of `node` equal to `part`, or else the one equal to it as a number (thresholds)."""
    if part in node:
        return part
    value = _as_float(part)
    if value is None:
        return None
    matches = [k for k in node if _as_float(k) == value]
    return matches[0] if len(matches) == 1 else None


def _as_float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _level_name(depth: int) -> str:
    return PARAM_JSON_LEVELS[depth] if depth < len(PARAM_JSON_LEVELS) else f"level {depth + 1}"


# --------------------------------------------------------------------------------------------
# Rendering


def fit_table(normalizer: Normalizer) -> Table:
    """A rich table of the parameters, fit quality and data of `normalizer`."""
    n = normalizer
    a, b, c, d = n.params
    table = Table(title="Location-aware normalizer", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    table.add_row("mean  μ(p) = a·ln p + c", f"a = {_fmt(a)}   c = {_fmt(c)}   R² = {_fmt(n.r2_mean)}")
    table.add_row(
        "std   σ(p) = max(b·ln p + d, floor)", f"b = {_fmt(b)}   d = {_fmt(d)}   R² = {_fmt(n.r2_std)}"
    )
    table.add_row("σ floor", f"{n.sigma_floor:g}")
    if n.bins:
        table.add_row(
            "bins",
            f"{n.num_bins_used} used, {n.num_bins_dropped} dropped"
            + (f" (< {n.min_bin_count} scores)" if n.min_bin_count else ""),
        )
    if n.num_samples is not None:
        responses = f" from {n.num_responses:,} responses" if n.num_responses is not None else ""
        table.add_row("samples", f"{n.num_samples:,} segment scores{responses}")
    if n.score_mean is not None:
        table.add_row("global score", f"mean = {_fmt(n.score_mean)}   std = {_fmt(n.score_std)}")
    origin = [n.source, n.reward_model, n.dataset]
    if n.granularity is not None:
        origin.append(n.granularity + (f" τ={n.threshold:g}" if n.granularity == "segment" else ""))
    table.add_row("source", " · ".join(str(x) for x in origin if x))
    for note in n.notes:
        table.add_row("note", note)
    if n.floor_warning:
        table.add_row("[yellow]warning[/]", f"[yellow]{n.floor_warning}[/]")
    return table


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# Sketch characters: the fitted curves, then the bins' points drawn over them.
_MEAN_CURVE, _STD_CURVE, _MEAN_POINT, _STD_POINT = "-", "=", "o", "x"


def curve_sketch(normalizer: Normalizer, width: int = 60, height: int = 14) -> str:
    """A plain-text sketch of μ(p) and σ(p) against ln p, with the used bins' means and stds.

    Exactly `height` lines of exactly `width` characters: the plot, an x axis, and a line with the
    ln p range and the legend. The x range is that of the bins (down to ln(1/2048) without bins).
    """
    label_w = 8
    plot_w, plot_h = width - label_w - 1, height - 2
    if plot_w < 10 or plot_h < 3:
        raise ValueError(f"curve_sketch needs width >= {label_w + 11} and height >= 5, got {width}x{height}")
    used = [b for b in normalizer.bins if b.get("used", True)]
    bin_x = [_bin_log_p(b) for b in used]
    x_min = min(bin_x, default=0.0)
    if x_min > -1e-6:  # no bins, or only p = 1 (a bandit RM): show the floor check's range
        x_min = math.log(FLOOR_CHECK_MIN_P)
    xs = np.linspace(x_min, 0.0, plot_w)
    mean_curve, std_curve = normalizer.mean(np.exp(xs)), normalizer.std(np.exp(xs))
    ys = [*mean_curve, *std_curve, *(b["mean"] for b in used), *(b["std"] for b in used)]
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 1.0, y_hi + 1.0

    grid = [[" "] * plot_w for _ in range(plot_h)]

    def put(x: float, y: float, char: str) -> None:
        col = round((x - x_min) / (0.0 - x_min) * (plot_w - 1))
        row = round((y_hi - y) / (y_hi - y_lo) * (plot_h - 1))
        if 0 <= col < plot_w and 0 <= row < plot_h:
            grid[row][col] = char

    for x, m, s in zip(xs, mean_curve, std_curve, strict=True):
        put(x, m, _MEAN_CURVE)
        put(x, s, _STD_CURVE)
    for x, b in zip(bin_x, used, strict=True):
        put(x, b["mean"], _MEAN_POINT)
        put(x, b["std"], _STD_POINT)

    labels = {0: f"{y_hi:.3g}", plot_h - 1: f"{y_lo:.3g}"}
    lines = [f"{labels.get(i, ''):>{label_w}}|" + "".join(row) for i, row in enumerate(grid)]
    lines.append(" " * label_w + "+" + "-" * plot_w)
    left, right = f"{'ln p':>{label_w}} {x_min:.2f}", "0"
    legend = f"  {_MEAN_CURVE} mean {_STD_CURVE} std {_MEAN_POINT} {_STD_POINT} bins  "
    room = width - len(left) - len(right)
    middle = legend.center(room) if len(legend) <= room else " " * max(room, 0)
    lines.append(left + middle + right)
    return "\n".join(line[:width].ljust(width) for line in lines)


def _bin_log_p(b: dict[str, Any]) -> float:
    """A bin's x position: its stored mean ln p, else ln of its key (hand-written files)."""
    if "log_p" in b:
        return float(b["log_p"])
    return math.log(max(float(b["p"]), FLOOR_CHECK_MIN_P))


def save_plot(normalizer: Normalizer, path: str | os.PathLike) -> Path:
    """Write a PNG of μ(p), σ(p) and the bins against ln p; needs matplotlib (not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "save_plot needs matplotlib, which segppo does not install: pip install matplotlib"
        ) from e
    used = [b for b in normalizer.bins if b.get("used", True)]
    x_min = min((_bin_log_p(b) for b in used), default=0.0)
    if x_min > -1e-6:
        x_min = math.log(FLOOR_CHECK_MIN_P)
    xs = np.linspace(x_min, 0.0, 200)
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.plot(xs, normalizer.mean(np.exp(xs)), label="μ(p) = a·ln p + c")
        ax.plot(xs, normalizer.std(np.exp(xs)), label="σ(p) = max(b·ln p + d, floor)")
        if used:
            ax.scatter([_bin_log_p(b) for b in used], [b["mean"] for b in used], s=8, label="bin means")
            ax.scatter(
                [_bin_log_p(b) for b in used], [b["std"] for b in used], s=8, marker="x", label="bin stds"
            )
        ax.set_xlabel("ln p  (p = k/K)")
        ax.set_ylabel("reward-model score")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


__all__ = [
    "DEFAULT_MIN_BIN_COUNT",
    "DEFAULT_SIGMA_FLOOR",
    "FloorViolation",
    "NORMALIZER_FILE",
    "Normalizer",
    "PointCollector",
    "StdFloorWarning",
    "bin_points",
    "curve_sketch",
    "fit_normalizer",
    "fit_table",
    "huber_line",
    "import_param_json",
    "param_json_keys",
    "save_plot",
    "segment_points",
    "std_floor_violations",
]
