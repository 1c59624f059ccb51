"""The location-aware normalizer (DESIGN.md §3.3): collect, fit, save/load, apply, import, render.

A segment-level reward model's raw score at segment `k` of `K` drifts with its relative position
`p = k/K`. The normalizer models that drift as `μ(p) = a·ln p + c` and `σ(p) = max(b·ln p + d, σ_floor)`
and PPO uses `(r - μ(p)) / σ(p)`. Parameters are `[a, b, c, d]`, the order of the paper's
`param.json` (mean slope, std slope, mean intercept, std intercept).

The modules, in the order a fit uses them:

- `core`: `Normalizer` (the parameters with the record of where they came from, `mean`/`std`/
  `apply` on tensors) and the std-floor check (`std_floor_violations`);
- `fit`: `segment_points` / `PointCollector` collect `(p, r)` for every segment of scored
  responses, `fit_normalizer` bins them by p (`equal_count_bins`, or the paper's `bin_points`) and
  fits the mean and std lines against ln p;
- `files`: `normalizer.json` (`Normalizer.save`/`load`) and the paper's `param.json`
  (`import_param_json`, `param_json_keys`);
- `render`: `fit_table`, `curve_sketch`, `save_plot`: what the CLI shows.

Only `core` and `files` are needed to load and apply a normalizer (PPO, eval): they import
neither scikit-learn nor matplotlib.
"""

from .core import (
    DEFAULT_SIGMA_FLOOR,
    FLOOR_CHECK_MIN_P,
    FloorViolation,
    Normalizer,
    StdFloorWarning,
    std_floor_violations,
)
from .files import (
    NORMALIZER_FILE,
    import_param_json,
    load_normalizer,
    normalizer_file,
    param_json_keys,
    save_normalizer,
)
from .fit import (
    DEFAULT_FIT_MODE,
    DEFAULT_MIN_BIN_COUNT,
    DEFAULT_MIN_R2,
    FIT_MODES,
    DroppedPointsWarning,
    PointCollector,
    PoorFitWarning,
    bin_points,
    equal_count_bins,
    fit_normalizer,
    huber_line,
    segment_points,
    weighted_line,
)
from .render import curve_sketch, fit_table, save_plot

__all__ = [
    "DEFAULT_FIT_MODE",
    "DEFAULT_MIN_BIN_COUNT",
    "DEFAULT_MIN_R2",
    "FIT_MODES",
    "DEFAULT_SIGMA_FLOOR",
    "DroppedPointsWarning",
    "FLOOR_CHECK_MIN_P",
    "FloorViolation",
    "NORMALIZER_FILE",
    "Normalizer",
    "PointCollector",
    "PoorFitWarning",
    "StdFloorWarning",
    "bin_points",
    "curve_sketch",
    "equal_count_bins",
    "fit_normalizer",
    "fit_table",
    "huber_line",
    "import_param_json",
    "load_normalizer",
    "normalizer_file",
    "param_json_keys",
    "save_normalizer",
    "save_plot",
    "segment_points",
    "std_floor_violations",
    "weighted_line",
]
