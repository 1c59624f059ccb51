"""What the CLI shows of a normalizer: a rich table, a plain-text sketch of the curves, a PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from .core import FLOOR_CHECK_MIN_P, Normalizer


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
        if n.points_used is not None:
            share = n.points_used / n.num_samples
            style = "[yellow]" if share < 0.5 else ""
            table.add_row(
                "points used", f"{style}{n.points_used:,} of {n.num_samples:,} ({share:.0%}){style and '[/]'}"
            )
    if n.mean_response_sum is not None:
        table.add_row(
            "normalized reward per response", f"{_fmt(n.mean_response_sum)} (on the fit data; ≈ 0 is centred)"
        )
    if n.last_segment:
        last = n.last_segment
        table.add_row(
            "last segment (p = 1)",
            f"mean {_fmt(last['mean'])}, {last['offset']:+.2f} σ off the others' line; "
            f"normalized mean {_fmt(last['mean_normalized'])} "
            f"(others {_fmt(last['others_mean_normalized'])})",
        )
    if n.score_mean is not None:
        table.add_row("global score", f"mean = {_fmt(n.score_mean)}   std = {_fmt(n.score_std)}")
    origin = [n.source + (f" ({n.fit_mode})" if n.fit_mode else ""), n.reward_model, n.dataset]
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
    """Write a PNG of μ(p), σ(p) and the bins against ln p."""
    # Imported here: matplotlib is slow to import and only this function needs it.
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:  # a dependency of segppo, but an environment can still lack it
        raise ImportError(
            "save_plot needs matplotlib, which is not importable here: pip install matplotlib"
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
