"""`segppo demo`: the whole method on the synthetic task, through the same code paths as the CLI.

    prepare (SFT policy, cached; prompts; preference pairs labelled by the gold reward)
      → rm train → fit-normalizer → ppo train → eval (RM and gold reward, held-out prompts)

Every stage is the library function its command calls, with a config object built here; nothing
is demo-only but the task itself. `--compare` repeats the reward-model-to-eval stages for several
granularities and seeds on the same SFT policy and data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from segppo.config import DemoConfig, EvalConfig, FitNormalizerConfig, PPOConfig, RMConfig
from segppo.eval import evaluate
from segppo.fit_normalizer import run_fit_normalizer
from segppo.io import atomic_write_json
from segppo.ppo.trainer import train_ppo
from segppo.rm.trainer import train_reward_model
from segppo.tracking import console, read_metrics

from .budget import DemoBudget, get_budget
from .data import DemoData, prepare
from .task import gold_rewards


@dataclass
class SettingResult:
    """One granularity and seed, from reward model to evaluation."""

    granularity: str
    seed: int
    rm_accuracy: float
    sft_gold: float
    sft_gold_se: float
    ppo_gold: float
    ppo_gold_se: float
    gold_win_rate: float  # PPO vs SFT on the same prompts and sampling seeds, ties count half
    gold_win_rate_se: float
    ppo_rm_reward: float
    sft_rm_reward: float
    num_prompts: int
    seconds: dict[str, float] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # per PPO step: RM reward and gold reward

    @property
    def gain_in_se(self) -> float:
        se = math.hypot(self.sft_gold_se, self.ppo_gold_se)
        return (self.ppo_gold - self.sft_gold) / se if se > 0 else float("inf")


def rm_config(budget: DemoBudget, data: DemoData, out: Path, granularity: str, seed: int) -> RMConfig:
    return RMConfig(
        model=str(data.policy),
        dataset=str(data.preferences),
        output=str(out / "rm"),
        granularity=granularity,
        entropy_threshold=budget.entropy_threshold,
        lr=budget.rm_lr,
        batch_size=budget.rm_batch_size,
        micro_batch_size=budget.rm_batch_size,
        epochs=budget.rm_epochs,
        max_len=budget.max_len,
        max_prompt_len=budget.max_prompt_len,
        zero_stage=0,
        warmup_ratio=0.05,
        seed=seed,
    )


def normalizer_config(budget: DemoBudget, data: DemoData, out: Path, seed: int) -> FitNormalizerConfig:
    return FitNormalizerConfig(
        reward_model=str(out / "rm"),
        dataset=str(data.preferences),
        output=str(out / "rm" / "normalizer.json"),
        samples=budget.normalizer_pairs,
        max_len=budget.max_len,
        max_prompt_len=budget.max_prompt_len,
        batch_size=64,
        into_rm=True,
        min_bin_count=4,
        seed=seed,
    )


def ppo_config(budget: DemoBudget, data: DemoData, out: Path, seed: int) -> PPOConfig:
    return PPOConfig(
        policy=str(data.policy),
        reward_model=str(out / "rm"),
        prompts=str(data.prompts_train),
        output=str(out / "ppo"),
        max_prompt_len=budget.max_prompt_len,
        max_new_tokens=budget.max_new_tokens,
        rollout_batch_size=budget.ppo_rollout_batch_size,
        micro_rollout_batch_size=budget.ppo_rollout_batch_size,
        train_batch_size=budget.ppo_train_batch_size,
        micro_train_batch_size=budget.ppo_train_batch_size,
        ppo_epochs=budget.ppo_epochs,
        max_steps=budget.ppo_steps,
        num_episodes=100,
        actor_lr=budget.actor_lr,
        critic_lr=budget.critic_lr,
        kl_coef=budget.kl_coef,
        critic_init="sft",
        zero_stage=0,
        warmup_ratio=0.05,
        num_logged_samples=budget.ppo_rollout_batch_size,
        seed=seed,
    )


def eval_config(budget: DemoBudget, data: DemoData, out: Path, seed: int, **overrides) -> EvalConfig:
    values = dict(
        policy=[str(data.policy), str(out / "ppo" / "policy")],
        name=["sft", "ppo"],
        baseline="sft",
        prompts=str(data.prompts_heldout),
        output=str(out / "eval"),
        reward_model=str(out / "rm"),
        max_prompt_len=budget.max_prompt_len,
        max_new_tokens=budget.max_new_tokens,
        batch_size=256,
        seed=seed,
    )
    values.update(overrides)
    return EvalConfig(**values)


def gold_curve(ppo_dir: Path) -> list[dict]:
    """Per PPO step, the RM reward (metrics.jsonl) and the gold reward of that step's logged rollouts."""
    steps: dict[int, list[float]] = {}
    for line in (ppo_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row["step"], []).append((row["messages"][-1]["content"], row["response_text"]))
    curve = []
    for metrics in read_metrics(ppo_dir, split="train"):
        rows = steps.get(metrics["step"], [])
        gold = gold_rewards([p for p, _ in rows], [r for _, r in rows]) if rows else []
        curve.append(
            {
                "step": metrics["step"],
                "rm_reward": metrics["reward"],
                "gold_reward": statistics.fmean(gold) if gold else float("nan"),
            }
        )
    return curve


def run_setting(budget: DemoBudget, data: DemoData, out: Path, granularity: str, seed: int) -> SettingResult:
    """rm train → fit-normalizer → ppo train → eval, for one granularity and seed."""
    seconds: dict[str, float] = {}

    def stage(name, fn):
        console.rule(f"[bold]{name}[/] ({granularity}, seed {seed})")
        start = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - start
        return result

    stage("rm train", lambda: train_reward_model(rm_config(budget, data, out, granularity, seed)))
    if granularity != "bandit":  # a bandit RM's normalizer is its score mean/std, recorded by rm train
        stage("fit-normalizer", lambda: run_fit_normalizer(normalizer_config(budget, data, out, seed)))
    stage("ppo train", lambda: train_ppo(ppo_config(budget, data, out, seed)))

    def evaluate_both():
        by_rm = evaluate(eval_config(budget, data, out, seed), progress=False)
        by_gold = evaluate(
            eval_config(budget, data, out, seed, reward_model=None, output=str(out / "eval_gold")),
            scorer_fn=gold_rewards,
            progress=False,
        )
        return by_rm, by_gold

    by_rm, by_gold = stage("eval", evaluate_both)
    rm_eval = read_metrics(out / "rm", split="eval")[-1]
    sft, ppo = by_gold.policies["sft"], by_gold.policies["ppo"]
    return SettingResult(
        granularity=granularity,
        seed=seed,
        rm_accuracy=rm_eval["accuracy"],
        sft_gold=sft.score.mean,
        sft_gold_se=sft.score.se,
        ppo_gold=ppo.score.mean,
        ppo_gold_se=ppo.score.se,
        gold_win_rate=ppo.win_rate.rate,
        gold_win_rate_se=ppo.win_rate.se,
        ppo_rm_reward=by_rm.policies["ppo"].score.mean,
        sft_rm_reward=by_rm.policies["sft"].score.mean,
        num_prompts=len(sft.generations),
        seconds=seconds,
        curve=gold_curve(out / "ppo"),
    )


def run_demo(cfg: DemoConfig) -> dict:
    """The whole demo; returns (and writes to `output/results.json`) what it measured."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    budget = get_budget(cfg.budget)
    out = Path(cfg.output)
    start = time.perf_counter()
    console.rule("[bold]task: SFT policy, prompts, preference pairs")
    data = prepare(out, budget, cache_dir=cfg.cache_dir, seed=cfg.seed, measure=False, log=console.print)
    prepare_seconds = time.perf_counter() - start
    granularities = cfg.compare or ["segment"]
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    results = []
    for granularity in granularities:
        for seed in seeds:
            folder = out / granularity / f"seed-{seed}" if cfg.compare or cfg.seeds > 1 else out
            results.append(run_setting(budget, data, folder, granularity, seed))
    summary = {
        "budget": budget.name,
        "prepare_seconds": prepare_seconds,
        "total_seconds": time.perf_counter() - start,
        "settings": [dataclasses.asdict(r) | {"gain_in_se": r.gain_in_se} for r in results],
        "task": data.report,
    }
    atomic_write_json(out / "results.json", summary)
    return summary


def _mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else float("nan")), float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def results_table(summary: dict):
    """The final table: gold reward of SFT vs PPO, RM accuracy, gold win rate, time per stage."""
    from rich.table import Table

    settings = summary["settings"]
    table = Table(title=f"segppo demo ({summary['budget']} budget): gold reward on held-out prompts")
    for column in (
        "setting",
        "SFT gold",
        "PPO gold",
        "gain / s.e.",
        "gold win rate",
        "RM accuracy",
        "RM reward SFT → PPO",
        "time (rm / fit / ppo / eval)",
    ):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for s in settings:
        t = s["seconds"]
        times = " / ".join(f"{t.get(k, 0):.0f}s" for k in ("rm train", "fit-normalizer", "ppo train", "eval"))
        table.add_row(
            f"{s['granularity']} (seed {s['seed']})",
            f"{s['sft_gold']:.3f} ± {s['sft_gold_se']:.3f}",
            f"{s['ppo_gold']:.3f} ± {s['ppo_gold_se']:.3f}",
            f"{s['gain_in_se']:+.1f}",
            f"{s['gold_win_rate']:.3f} ± {s['gold_win_rate_se']:.3f}",
            f"{s['rm_accuracy']:.3f}",
            f"{s['sft_rm_reward']:.2f} → {s['ppo_rm_reward']:.2f}",
            times,
        )
    return table


def comparison_table(summary: dict):
    """Gold reward per granularity, mean ± s.e. over seeds (`--compare`)."""
    from rich.table import Table

    table = Table(title="gold reward of the PPO policy per reward granularity (mean ± s.e. over seeds)")
    for column in ("granularity", "seeds", "PPO gold", "gain over SFT", "gold win rate vs SFT"):
        table.add_column(column, justify="left" if column == "granularity" else "right")
    by_granularity: dict[str, list[dict]] = {}
    for s in summary["settings"]:
        by_granularity.setdefault(s["granularity"], []).append(s)
    for granularity, rows in by_granularity.items():
        gold, gold_se = _mean_se([r["ppo_gold"] for r in rows])
        gain, gain_se = _mean_se([r["ppo_gold"] - r["sft_gold"] for r in rows])
        win, win_se = _mean_se([r["gold_win_rate"] for r in rows])
        table.add_row(
            granularity,
            str(len(rows)),
            f"{gold:.3f} ± {gold_se:.3f}",
            f"{gain:+.3f} ± {gain_se:.3f}",
            f"{win:.3f} ± {win_se:.3f}",
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
