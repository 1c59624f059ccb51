"""The reward models' learning curve on a demo task, before any PPO: held-out accuracy and local
credit against the number of preference pairs and epochs, for each granularity and seed.

    from segppo.demo.learning_curve import CurveSettings, run_learning_curve
    summary = run_learning_curve("runs/curve", CurveSettings(task="pairs", multipliers=(1, 2)))

The SFT policy (cached) and one pool of preference pairs, as many as the largest point needs, are
made once; a point with `n` pairs trains on the pool's first `n` (so the sets are nested) with the
budget's RM settings (`segppo.demo.pipeline.rm_config`), for `epochs` epochs with held-out
accuracy measured after every epoch. The final RM of each point gets the comparison's normalizer
and its local credit (`segppo.demo.credit`). `curve.json` is rewritten after every point, and a
rerun into the same folder reuses the data and skips the points already there, so a run cut short
keeps what finished and can be continued, also with more seeds or granularities, or more multipliers
no larger than the largest so far (the points take prefixes of the same pool; a larger one makes a
new pool and starts over); the earlier points stay in the summary.

Two reference accuracies on the same held-out labels bound what an RM can reach: the gold reward's
(the labels are Bradley-Terry draws, so it is below 1) and that of a matching-blind scorer, the gold
reward with every item whose color and animal are both in the prompt given the same value (their
mean in the training pairs): the best an RM can do that reads everything but which color goes with
which animal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segppo.config import GRANULARITIES, DemoConfig
from segppo.fit_normalizer import run_fit_normalizer
from segppo.io import atomic_write_json
from segppo.rm.trainer import train_reward_model
from segppo.tracking import read_metrics

from .budget import DemoBudget, get_budget
from .compare import _mean_se
from .credit import local_credit
from .data import DemoData, prepare
from .pipeline import heldout_responses, normalizer_config, rm_config, run_record
from .sft import SFTSettings, sft_policy
from .task import gold_reward, length_term, parse_prompt, phrase_rewards, words

# The budget fields the data depend on (besides `preference_pairs`): RM settings and backbone do not.
DATA_FIELDS = (
    "sft",
    "eval_preference_pairs",
    "ppo_prompts",
    "heldout_prompts",
    "max_new_tokens",
    "temperature",
    "label_temperature",
    "generate_batch_size",
)
TARGET_ACCURACY = 0.70  # issue 24: the budget at which every granularity's RM clears this
RESULTS_FILE = "curve.json"


@dataclass(frozen=True)
class CurveSettings:
    """What the curve measures. `budget` names the demo budget whose RM settings (lr, batch size,
    lengths, entropy threshold, backbone) are used and whose `preference_pairs` is the 1× point;
    `rm_backbone` overrides that budget's backbone."""

    task: str = "pairs"
    budget: str = "default"
    multipliers: tuple[float, ...] = (1, 2, 4, 8)
    epochs: int = 2
    granularities: tuple[str, ...] = GRANULARITIES
    seeds: int = 2
    first_seed: int = 0
    eval_pairs: int = 2048  # held-out pairs: the standard error of an accuracy near 0.7 is 0.010
    rm_backbone: SFTSettings | None = None

    def __post_init__(self) -> None:
        if not self.multipliers or min(self.multipliers) <= 0:
            raise ValueError(f"multipliers must be positive, got {self.multipliers}")
        if self.epochs < 1 or self.seeds < 1:
            raise ValueError(f"epochs and seeds must be at least 1, got {self.epochs} and {self.seeds}")
        unknown = [g for g in self.granularities if g not in GRANULARITIES]
        if unknown:
            raise ValueError(f"unknown granularities {unknown}; one of {GRANULARITIES}")

    def base_budget(self) -> DemoBudget:
        budget = get_budget(self.budget)
        budget = dataclasses.replace(budget, sft=dataclasses.replace(budget.sft, task=self.task))
        if self.rm_backbone is not None:
            budget = dataclasses.replace(budget, rm_backbone=self.rm_backbone)
        return budget

    def pool_budget(self) -> DemoBudget:
        """The base budget with as many training pairs as the largest point needs."""
        base = self.base_budget()
        return dataclasses.replace(
            base,
            preference_pairs=self.pairs(max(self.multipliers)),
            eval_preference_pairs=self.eval_pairs,
        )

    def pairs(self, multiplier: float) -> int:
        return int(round(multiplier * self.base_budget().preference_pairs))


def run_learning_curve(
    output: str | Path,
    settings: CurveSettings,
    *,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every point of the curve, smallest first; returns (and rewrites after each point) the summary."""
    out = Path(output)
    pool = settings.pool_budget()
    data, reused = _prepared_data(out, pool, cache_dir, settings.first_seed, log)
    ceilings = label_ceilings(data.preferences)
    log(
        f"held-out label accuracy of the gold reward {ceilings['gold']:.3f}, "
        f"of the matching-blind scorer {ceilings['matching_blind']:.3f}"
    )
    path = out / RESULTS_FILE
    points = _finished_points(path, settings) if reused else []  # points belong to their data
    record = run_record(
        DemoConfig(task=settings.task, seed=settings.first_seed, threads=threads), settings.seeds
    )
    for multiplier in sorted(settings.multipliers):
        n = settings.pairs(multiplier)
        budget = dataclasses.replace(pool, preference_pairs=n)
        for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
            for granularity in settings.granularities:
                if any(_same_point(p, granularity, n, seed) for p in points):
                    continue
                log(f"point: {granularity}, {n} pairs, seed {seed}")
                points.append(run_point(budget, data, out, granularity, n, seed, settings.epochs))
                points[-1]["multiplier"] = multiplier
                atomic_write_json(path, summarize(settings, pool, record, ceilings, points))
    summary = summarize(settings, pool, record, ceilings, points)
    atomic_write_json(path, summary)
    return summary


def run_point(
    budget: DemoBudget, data: DemoData, out: Path, granularity: str, n: int, seed: int, epochs: int
) -> dict:
    """rm train on the pool's first `n` pairs (held-out accuracy after each epoch), the normalizer
    the comparison fits, and the final RM's local credit."""
    folder = out / f"pairs-{n}" / granularity / f"seed-{seed}"
    if folder.exists():  # what a run cut short left of this point
        shutil.rmtree(folder)
    steps_per_epoch = n // budget.rm_batch_size
    cfg = dataclasses.replace(
        rm_config(budget, data, folder, granularity, seed, epochs), max_samples=n, eval_every=steps_per_epoch
    )
    start = time.perf_counter()
    train_reward_model(cfg)
    rm_seconds = time.perf_counter() - start
    if granularity != "bandit":  # as `run_setting` does: a bandit RM records its own mean/std
        run_fit_normalizer(normalizer_config(budget, data, folder, seed))
    credit = local_credit(folder / "rm", *heldout_responses(data, budget.credit_responses))
    evals = read_metrics(folder / "rm", split="eval")
    return {
        "granularity": granularity,
        "pairs": n,
        "seed": seed,
        "epochs": epochs,
        "accuracy_by_epoch": [e["accuracy"] for e in evals],
        "accuracy": evals[-1]["accuracy"],
        "eval_pairs": evals[-1]["num_pairs"],
        "local_credit": credit["correlation"],
        "pair_auc": credit["pair_auc"],
        "rm_seconds": rm_seconds,
    }


def label_ceilings(preferences: Path) -> dict:
    """Accuracy on the held-out labels of the gold reward and of the matching-blind scorer."""
    train = _rows(preferences / "train.jsonl")
    test = _rows(preferences / "test.jsonl")
    in_prompt = [
        p.reward
        for row in train
        for side in ("chosen", "rejected")
        for p in phrase_rewards(row["prompt"], row[side])
        if _pair_in_prompt(parse_prompt(row["prompt"]), p)
    ]
    value = statistics.fmean(in_prompt) if in_prompt else 0.0

    def matching_blind(prompt: str, response: str) -> float:
        task = parse_prompt(prompt)
        phrases = phrase_rewards(task, response)
        total = sum(value if _pair_in_prompt(task, p) else p.reward for p in phrases)
        return total + length_term(len(words(response)))

    return {
        "gold": _label_accuracy(test, gold_reward),
        "matching_blind": _label_accuracy(test, matching_blind),
        "in_prompt_item_value": value,
        "eval_pairs": len(test),
    }


def _pair_in_prompt(task, phrase) -> bool:
    colors, animals = {c for c, _ in task.pairs}, {a for _, a in task.pairs}
    return phrase.kind == "pair" and phrase.value in colors and phrase.animal in animals


def _label_accuracy(rows: list[dict], score) -> float:
    def agrees(row):
        chosen, rejected = score(row["prompt"], row["chosen"]), score(row["prompt"], row["rejected"])
        return 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0

    return statistics.fmean(agrees(r) for r in rows) if rows else float("nan")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(
    settings: CurveSettings, pool: DemoBudget, record: dict, ceilings: dict, points: list[dict]
) -> dict:
    """The points, their means over seeds per (granularity, pairs, epoch), and the cheapest budget
    (pairs × epochs) at which every granularity's mean held-out accuracy clears the target."""
    table = []
    earlier = [g for g in GRANULARITIES if g not in settings.granularities]  # from an earlier run
    granularities = [*settings.granularities, *earlier]
    for n in sorted({p["pairs"] for p in points}):
        for epoch in range(1, settings.epochs + 1):
            for granularity in granularities:
                rows = [p for p in points if p["pairs"] == n and p["granularity"] == granularity]
                accuracies = [p["accuracy_by_epoch"][epoch - 1] for p in rows]
                if not accuracies:
                    continue
                final = epoch == settings.epochs  # credit is measured on the final RM only
                table.append(
                    {
                        "granularity": granularity,
                        "pairs": n,
                        "epoch": epoch,
                        "seeds": len(rows),
                        "accuracy": _mean_se(accuracies),
                        "local_credit": _mean_se([p["local_credit"] for p in rows]) if final else None,
                        "pair_auc": _mean_se([p["pair_auc"] for p in rows]) if final else None,
                    }
                )
    return {
        "settings": _jsonable(dataclasses.asdict(settings)),
        "budget": _jsonable(dataclasses.asdict(pool)),
        "run": record,
        "ceilings": ceilings,
        "target_accuracy": TARGET_ACCURACY,
        "first_clearing": first_clearing(table, settings.granularities),
        "table": table,
        "points": points,
    }


def first_clearing(table: list[dict], granularities) -> dict | None:
    """The (pairs, epoch) of least pairs × epochs at which every granularity's mean accuracy clears
    the target; None when no point does."""
    cells: dict[tuple[int, int], dict[str, float]] = {}
    for row in table:
        cells.setdefault((row["pairs"], row["epoch"]), {})[row["granularity"]] = row["accuracy"][0]
    clearing = [
        (n * epoch, n, epoch)
        for (n, epoch), accuracy in cells.items()
        if set(accuracy) == set(granularities) and min(accuracy.values()) >= TARGET_ACCURACY
    ]
    if not clearing:
        return None
    _, n, epoch = min(clearing)
    return {"pairs": n, "epoch": epoch, "accuracy": cells[n, epoch]}


def curve_markdown(summary: dict) -> str:
    """The table for benchmarks/RESULTS.md: mean ± s.e. over seeds per granularity, pairs and epoch."""

    def cell(value):
        if value is None:
            return ""
        mean, se = value
        if math.isnan(mean):
            return "n/a"
        return f"{mean:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}")

    lines = [
        "| pairs | epoch | granularity | seeds | held-out accuracy | local credit | right-vs-swapped AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["table"]:
        lines.append(
            f"| {row['pairs']} | {row['epoch']} | {row['granularity']} | {row['seeds']} | "
            f"{cell(row['accuracy'])} | {cell(row['local_credit'])} | {cell(row['pair_auc'])} |"
        )
    return "\n".join(lines)


def save_curve_plot(summary: dict, path: str | Path) -> Path:
    """Held-out accuracy and local credit against training pairs, one line per granularity and epoch,
    with the target and the two reference accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, credit_ax) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = summary["settings"]["epochs"]
    for i, granularity in enumerate(summary["settings"]["granularities"]):
        color = f"C{i}"
        for epoch in range(1, epochs + 1):
            rows = [r for r in summary["table"] if r["granularity"] == granularity and r["epoch"] == epoch]
            xs = [r["pairs"] for r in rows]
            style = "-" if epoch == epochs else ":"
            acc_ax.errorbar(
                xs,
                [r["accuracy"][0] for r in rows],
                yerr=[0 if math.isnan(r["accuracy"][1]) else r["accuracy"][1] for r in rows],
                color=color,
                linestyle=style,
                marker="o",
                label=f"{granularity}, epoch {epoch}",
            )
            if epoch == epochs:
                credit_ax.plot(
                    xs, [r["local_credit"][0] for r in rows], color=color, marker="o", label=granularity
                )
    ceilings = summary["ceilings"]
    acc_ax.axhline(summary["target_accuracy"], color="black", linewidth=1, label="target")
    acc_ax.axhline(ceilings["gold"], color="grey", linestyle="--", linewidth=1, label="gold reward")
    acc_ax.axhline(
        ceilings["matching_blind"], color="grey", linestyle="-.", linewidth=1, label="matching-blind"
    )
    for ax in (acc_ax, credit_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("preference pairs")
    acc_ax.set(title="RM held-out accuracy", ylabel="accuracy")
    credit_ax.set(title="RM local credit (final epoch)", ylabel="corr(phrase reward, gold)")
    acc_ax.legend(fontsize=7)
    credit_ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _prepared_data(out: Path, pool: DemoBudget, cache_dir, seed: int, log) -> tuple[DemoData, bool]:
    """The data of an earlier run into `out` (or copied there) when they were made with the same
    data settings and seed and hold at least as many training pairs (the points take prefixes),
    else new data; and whether they were reused."""
    data_dir = out / "data"
    report_path = data_dir / "task_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        wanted = _jsonable(dataclasses.asdict(pool))
        made = report["budget"]
        if (
            report["seed"] == seed
            and made["preference_pairs"] >= pool.preference_pairs
            and all(made[k] == wanted[k] for k in DATA_FIELDS)
        ):
            log(f"reusing the data in {data_dir}")
            backbone = None
            if pool.rm_backbone is not None:
                settings = dataclasses.replace(pool.rm_backbone, task=pool.sft.task)
                backbone = sft_policy(cache_dir, settings, log=log)
            data = DemoData(
                policy=sft_policy(cache_dir, pool.sft, log=log),
                prompts_train=data_dir / "prompts_train.jsonl",
                prompts_heldout=data_dir / "prompts_heldout.jsonl",
                preferences=data_dir / "preferences",
                report=report,
                rm_backbone=backbone,
            )
            return data, True
    return prepare(out, pool, cache_dir=cache_dir, seed=seed, measure=False, log=log), False


# The settings that only choose which points to run: a point is its (granularity, pairs, seed).
GRID_FIELDS = {"multipliers": None, "seeds": None, "granularities": None}


def _finished_points(path: Path, settings: CurveSettings) -> list[dict]:
    """The points of an earlier run on the same data with the same settings but for which points it
    ran (multipliers, seeds, granularities)."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    mine = _jsonable(dataclasses.asdict(settings))
    same = {**earlier["settings"], **GRID_FIELDS} == {**mine, **GRID_FIELDS}
    return earlier["points"] if same else []


def _same_point(point: dict, granularity: str, n: int, seed: int) -> bool:
    return point["granularity"] == granularity and point["pairs"] == n and point["seed"] == seed


def _jsonable(value):
    return json.loads(json.dumps(value))
