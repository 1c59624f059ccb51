"""Score distributions per policy as a PNG (needs matplotlib, which segppo does not depend on)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from segppo.io import atomic_file

MATPLOTLIB_MISSING = "matplotlib is not installed: no score-distribution plot (pip install matplotlib)"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_score_distributions(
    path: Path, panels: Mapping[str, Mapping[str, Sequence[float]]], title: str | None = None
) -> Path | None:
    """One histogram panel per metric (`panels[metric][policy] = scores`), policies overlaid.

    Returns the PNG's path, or None when matplotlib is not installed. Written atomically.
    """
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (metric, by_policy) in zip(axes[0], panels.items(), strict=True):
        values = np.concatenate([np.asarray(v, dtype=float) for v in by_policy.values()])
        bins = np.histogram_bin_edges(values, bins=min(40, max(10, int(np.sqrt(values.size)))))
        for policy, scores in by_policy.items():
            scores = np.asarray(scores, dtype=float)
            ax.hist(scores, bins=bins, alpha=0.45, label=f"{policy} (mean {scores.mean():.3g})")
            ax.axvline(scores.mean(), linestyle="--", linewidth=1)
        ax.set_xlabel(metric.replace("_", " "))
        ax.set_ylabel("responses")
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")  # the temporary name says nothing of the format
    finally:
        plt.close(fig)
    return Path(path)
