"""What `segppo demo` reports from its settings: the paired statistics of a comparison (gold gain
of one granularity minus another's on the same seed), warnings about its reward models, the result
tables and the PPO reward curves. Pure functions of the rows `segppo.demo.pipeline` records."""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path

# Held-out RM accuracy below this is reported as near chance: with 512 held-out pairs the standard
# error of an accuracy near 0.5 is 0.022, so 0.6 is more than 4 of them above chance.
NEAR_CHANCE_ACCURACY = 0.6
# An RM whose held-out accuracy rose more than this over its last epoch had not levelled off.
STILL_CLIMBING = 0.01
# Granularities' RMs whose mean held-out accuracies differ by more than this are not matched: a
# difference in PPO's gain may then come from how well each RM learned, not from its granularity.
MATCHED_WITHIN = 0.05


def paired_differences(rows: list[dict]) -> list[dict]:
    """For each pair of granularities, the gold gain of one minus the other's on the same seed (same
    SFT policy, data, prompts and sampling seeds), mean ± s.e. over seeds, with the per-seed values."""
    gain = {(r["granularity"], r["seed"]): r["ppo_gold"] - r["sft_gold"] for r in rows}
    order = list(dict.fromkeys(r["granularity"] for r in rows))
    out = []
    for a, b in itertools.combinations(order, 2):
        seeds = sorted(s for g, s in gain if g == a and (b, s) in gain)
        per_seed = [gain[a, s] - gain[b, s] for s in seeds]
        mean, se = _mean_se(per_seed)
        out.append({"a": a, "b": b, "seeds": seeds, "per_seed": per_seed, "mean": mean, "se": se})
    return out


def rm_warnings(rows: list[dict]) -> list[str]:
    """RMs near chance (then PPO differences are noise), RMs still climbing when training ended, and
    granularities whose RMs are not matched in accuracy (mean over seeds)."""
    warnings = []
    for r in rows:
        name = f"{r['granularity']} RM (seed {r['seed']})"
        if r["rm_accuracy"] < NEAR_CHANCE_ACCURACY:
            warnings.append(
                f"{name}: held-out accuracy {r['rm_accuracy']:.3f} is near chance; its PPO result says "
                "nothing about the granularity"
            )
        if r["rm_last_epoch_gain"] > STILL_CLIMBING:
            warnings.append(
                f"{name}: held-out accuracy rose {r['rm_last_epoch_gain']:+.3f} over its last epoch; "
                "it had not levelled off"
            )
    by_granularity: dict[str, list[float]] = {}
    for r in rows:
        by_granularity.setdefault(r["granularity"], []).append(r["rm_accuracy"])
    means = {g: statistics.fmean(a) for g, a in by_granularity.items()}
    spread = max(means.values(), default=0.0) - min(means.values(), default=0.0)
    if spread > MATCHED_WITHIN:
        listed = ", ".join(f"{g} {a:.3f}" for g, a in means.items())
        warnings.append(
            f"the RMs are not matched in held-out accuracy ({listed}: a spread of {spread:.3f} > "
            f"{MATCHED_WITHIN}); differences in PPO's gain mix granularity with RM quality"
        )
    return warnings


def _mean_se(values: list[float]) -> tuple[float, float]:
    if any(math.isnan(v) for v in values):  # e.g. the last-epoch rise of a one-epoch RM
        return float("nan"), float("nan")
    if len(values) < 2:
        return (values[0] if values else float("nan")), float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def results_table(summary: dict):
    """The final table: gold reward of SFT vs PPO, RM accuracy, gold win rate, time per stage."""
    from rich.table import Table

    settings = summary["settings"]
    table = Table(
        title=f"segppo demo ({summary['budget']} budget, task {summary['task']}): "
        "gold reward on held-out prompts"
    )
    for column in (
        "setting",
        "SFT gold",
        "PPO gold",
        "gain / s.e.",
        "gold win rate",
        "RM accuracy",
        "local credit",
        "length SFT → PPO",
        "RM reward SFT → PPO",
        "time (rm / fit / ppo / eval)",
    ):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for s in settings:
        t = s["seconds"]
        stages = ("rm train", "fit-normalizer", "ppo train", "eval")
        times = " / ".join(f"{t.get(k, 0):.0f}s" for k in stages)
        table.add_row(
            f"{s['granularity']} (seed {s['seed']})",
            f"{s['sft_gold']:.3f} ± {s['sft_gold_se']:.3f}",
            f"{s['ppo_gold']:.3f} ± {s['ppo_gold_se']:.3f}",
            f"{s['gain_in_se']:+.1f}",
            f"{s['gold_win_rate']:.3f} ± {s['gold_win_rate_se']:.3f}",
            f"{s['rm_accuracy']:.3f}",
            f"{s['local_credit']:+.3f}",
            f"{s['sft_length']:.1f} → {s['ppo_length']:.1f}",
            f"{s['sft_rm_reward']:.2f} → {s['ppo_rm_reward']:.2f}",
            times,
        )
    return table


def comparison_table(summary: dict):
    """Per granularity, mean ± s.e. over seeds: the RM (held-out accuracy, its rise over the last
    epoch, local credit, and on `pairs` the AUC of right against swapped items) and what PPO on it
    did (gold gain over SFT, win rate, response length)."""
    from rich.table import Table

    title = "per reward granularity, mean ± s.e. over seeds"
    if not summary.get("is_comparison", True):
        title += f" ({summary['budget']} budget: a pipeline check, NOT a comparison)"
    table = Table(title=title)
    columns = (
        "granularity",
        "seeds",
        "RM accuracy",
        "last-epoch rise",
        "local credit",
        "pair AUC",
        "gain over SFT",
        "gold win rate",
        "length SFT → PPO",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "granularity" else "right")
    by_granularity: dict[str, list[dict]] = {}
    for s in summary["settings"]:
        by_granularity.setdefault(s["granularity"], []).append(s)

    def cell(rows, key, fmt=".3f"):
        # results.json written before a column existed (pair AUC) reads n/a there
        mean, se = _mean_se([r.get(key, math.nan) for r in rows])
        if math.isnan(mean):
            return "n/a"
        return f"{mean:{fmt}}" + ("" if math.isnan(se) else f" ± {se:.3f}")

    for granularity, rows in by_granularity.items():
        for r in rows:
            r["gain"] = r["ppo_gold"] - r["sft_gold"]
        table.add_row(
            granularity,
            str(len(rows)),
            cell(rows, "rm_accuracy"),
            cell(rows, "rm_last_epoch_gain", "+.3f"),
            cell(rows, "local_credit", "+.3f"),
            cell(rows, "pair_auc"),
            cell(rows, "gain", "+.3f"),
            cell(rows, "gold_win_rate"),
            f"{statistics.fmean(r['sft_length'] for r in rows):.1f} → "
            f"{statistics.fmean(r['ppo_length'] for r in rows):.1f}",
        )
    return table


def paired_table(summary: dict):
    """Gold gain of granularity a minus b on the same seeds, mean ± s.e. over seeds."""
    from rich.table import Table

    table = Table(title="paired differences in gold gain (a − b, same seed, SFT, data and prompts)")
    for column in ("a − b", "seeds", "mean ± s.e.", "mean / s.e.", "per seed"):
        table.add_column(column, justify="left" if column == "a − b" else "right")
    for d in summary["paired_differences"]:
        ratio = d["mean"] / d["se"] if d["se"] and math.isfinite(d["se"]) else float("nan")
        table.add_row(
            f"{d['a']} − {d['b']}",
            str(len(d["seeds"])),
            f"{d['mean']:+.3f} ± {d['se']:.3f}",
            f"{ratio:+.1f}",
            " ".join(f"{v:+.3f}" for v in d["per_seed"]),
        )
    return table


def save_curves(summary: dict, path: Path) -> Path:
    """A PNG of the gold and RM reward of PPO's rollouts across steps, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, rm_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for s in summary["settings"]:
        steps = [c["step"] for c in s["curve"]]
        label = f"{s['granularity']} (seed {s['seed']})"
        gold_ax.plot(steps, [c["gold_reward"] for c in s["curve"]], label=label)
        rm_ax.plot(steps, [c["rm_reward"] for c in s["curve"]], label=label)
        gold_ax.axhline(s["sft_gold"], color="grey", linestyle=":", linewidth=1)
    gold_ax.set(title="gold reward of PPO rollouts", xlabel="PPO step", ylabel="gold reward")
    rm_ax.set(title="RM reward of PPO rollouts", xlabel="PPO step", ylabel="RM sequence score")
    gold_ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
