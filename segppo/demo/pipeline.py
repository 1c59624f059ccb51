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
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from segppo.config import DemoConfig, EvalConfig, FitNormalizerConfig, PPOConfig, RMConfig
from segppo.eval import evaluate
from segppo.fit_normalizer import run_fit_normalizer
from segppo.io import atomic_write_json, check_output_folder
from segppo.ppo.trainer import train_ppo
from segppo.rm.trainer import train_reward_model
from segppo.state import check_run_folder
from segppo.tracking import console, read_metrics

from .budget import DemoBudget, get_budget
from .compare import (
    NEAR_CHANCE_ACCURACY,
    STILL_CLIMBING,
    comparison_table,
    paired_differences,
    paired_table,
    results_table,
    rm_warnings,
    save_curves,
)
from .credit import local_credit
from .data import DemoData, prepare
from .task import gold_rewards

# The tables and statistics of `compare` are re-exported: callers (cli/demo.py, tests) import them
# from here.
__all__ = [
    "COMPARE_SEEDS",
    "NEAR_CHANCE_ACCURACY",
    "STILL_CLIMBING",
    "SettingResult",
    "comparison_table",
    "eval_config",
    "gold_curve",
    "heldout_responses",
    "normalizer_config",
    "paired_differences",
    "paired_table",
    "ppo_config",
    "results_table",
    "rm_accuracy_curve",
    "rm_config",
    "rm_warnings",
    "run_demo",
    "run_record",
    "run_setting",
    "save_curves",
]


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
    sft_length: float = float("nan")  # mean response length in tokens, held-out prompts
    ppo_length: float = float("nan")
    rm_accuracy_curve: list[dict] = field(default_factory=list)  # held-out accuracy during rm train
    rm_last_epoch_gain: float = float("nan")  # held-out accuracy gained over the RM's last epoch
    local_credit: float = float("nan")  # corr(dense reward summed per phrase, its gold contribution)
    pair_auc: float = float("nan")  # pairs task: P(a right item's phrase reward > a swapped item's)
    seconds: dict[str, float] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # per PPO step: RM reward and gold reward

    @property
    def gain_in_se(self) -> float:
        se = math.hypot(self.sft_gold_se, self.ppo_gold_se)
        return (self.ppo_gold - self.sft_gold) / se if se > 0 else float("inf")


def rm_config(
    budget: DemoBudget, data: DemoData, out: Path, granularity: str, seed: int, epochs: int | None = None
) -> RMConfig:
    epochs = epochs or budget.rm_epochs
    steps_per_epoch = budget.preference_pairs // budget.rm_batch_size
    return RMConfig(
        model=str(data.rm_backbone or data.policy),
        dataset=str(data.preferences),
        output=str(out / "rm"),
        granularity=granularity,
        entropy_threshold=budget.entropy_threshold,
        segmenter=str(data.policy),  # the reference's entropy, whatever the RM starts from
        lr=budget.rm_lr,
        batch_size=budget.rm_batch_size,
        micro_batch_size=budget.rm_batch_size,
        epochs=epochs,
        eval_every=max(1, steps_per_epoch // budget.rm_evals_per_epoch),
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


def rm_accuracy_curve(rm_dir: Path, steps_per_epoch: int) -> tuple[list[dict], float]:
    """Held-out accuracy at each evaluation of rm train, and how much it rose over the last epoch."""
    curve = [{"step": m["step"], "accuracy": m["accuracy"]} for m in read_metrics(rm_dir, split="eval")]
    last = curve[-1]
    before = [c for c in curve if c["step"] <= last["step"] - steps_per_epoch]
    gain = last["accuracy"] - before[-1]["accuracy"] if before else float("nan")
    return curve, gain


def heldout_responses(data: DemoData, n: int) -> tuple[list[str], list[str]]:
    """Prompts and responses of the held-out preference pairs (both sides), at most `n` responses."""
    prompts, responses = [], []
    for line in (data.preferences / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        for side in ("chosen", "rejected"):
            prompts.append(row["prompt"])
            responses.append(row[side])
    return prompts[:n], responses[:n]


def run_setting(
    budget: DemoBudget, data: DemoData, out: Path, granularity: str, seed: int, rm_epochs: int | None = None
) -> SettingResult:
    """rm train → fit-normalizer → ppo train → eval, for one granularity and seed."""
    seconds: dict[str, float] = {}

    def stage(name, fn):
        console.rule(f"[bold]{name}[/] ({granularity}, seed {seed})")
        start = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - start
        return result

    rm_cfg = rm_config(budget, data, out, granularity, seed, rm_epochs)
    stage("rm train", lambda: train_reward_model(rm_cfg))
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
    curve, last_epoch_gain = rm_accuracy_curve(out / "rm", budget.preference_pairs // budget.rm_batch_size)
    # Not a pipeline stage (nothing downstream reads it), so not in `seconds`.
    credit = local_credit(out / "rm", *heldout_responses(data, budget.credit_responses))
    sft, ppo = by_gold.policies["sft"], by_gold.policies["ppo"]
    return SettingResult(
        granularity=granularity,
        seed=seed,
        rm_accuracy=curve[-1]["accuracy"],
        sft_gold=sft.score.mean,
        sft_gold_se=sft.score.se,
        ppo_gold=ppo.score.mean,
        ppo_gold_se=ppo.score.se,
        gold_win_rate=ppo.win_rate.rate,
        gold_win_rate_se=ppo.win_rate.se,
        ppo_rm_reward=by_rm.policies["ppo"].score.mean,
        sft_rm_reward=by_rm.policies["sft"].score.mean,
        num_prompts=len(sft.generations),
        sft_length=sft.response_length.mean,
        ppo_length=ppo.response_length.mean,
        rm_accuracy_curve=curve,
        rm_last_epoch_gain=last_epoch_gain,
        local_credit=credit["correlation"],
        pair_auc=credit["pair_auc"],
        seconds=seconds,
        curve=gold_curve(out / "ppo"),
    )


def check_fresh_output(out: Path, folders: list[Path]) -> None:
    """Each setting trains into `folder/rm` and `folder/ppo`, which rm train and ppo train refuse
    when they hold a run: an earlier demo's is refused here, before minutes of data and SFT."""
    check_output_folder(out)
    for folder in folders:
        for run in (folder / "rm", folder / "ppo"):
            try:
                check_run_folder(run, resume=False)
            except FileExistsError as err:
                raise FileExistsError(
                    f"--output {out}: {run} holds an earlier demo's run; choose another --output or remove it"
                ) from err


def run_demo(cfg: DemoConfig) -> dict:
    """The whole demo; returns (and writes to `output/results.json`) what it measured."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    budget = get_budget(cfg.budget)
    budget = dataclasses.replace(budget, sft=dataclasses.replace(budget.sft, task=cfg.task))
    out = Path(cfg.output)
    granularities = cfg.compare or ["segment"]
    num_seeds = cfg.seeds or (COMPARE_SEEDS if cfg.compare else 1)
    seeds = range(cfg.seed, cfg.seed + num_seeds)
    by_setting = cfg.compare or num_seeds > 1  # a folder per setting, else the output itself

    def setting_folder(granularity: str, seed: int) -> Path:
        return out / granularity / f"seed-{seed}" if by_setting else out

    check_fresh_output(out, [setting_folder(g, s) for s in seeds for g in granularities])
    start = time.perf_counter()
    console.rule("[bold]task: SFT policy, prompts, preference pairs")
    data = prepare(out, budget, cache_dir=cfg.cache_dir, seed=cfg.seed, measure=False, log=console.print)
    prepare_seconds = time.perf_counter() - start
    # A comparison gives every granularity's RM the same, longer training (see `compare_rm_epochs`).
    rm_epochs = budget.compare_rm_epochs if cfg.compare else budget.rm_epochs
    rows: list[dict] = []
    # Seed by seed, and results.json rewritten after every setting, so that an interrupted
    # comparison leaves complete seeds with their paired differences.
    for seed in seeds:
        for granularity in granularities:
            folder = setting_folder(granularity, seed)
            result = run_setting(budget, data, folder, granularity, seed, rm_epochs)
            rows.append(dataclasses.asdict(result) | {"gain_in_se": result.gain_in_se})
            summary = _summary(cfg, budget, data, num_seeds, rows, prepare_seconds, start)
            atomic_write_json(out / "results.json", summary)
    return summary


def _summary(
    cfg: DemoConfig,
    budget: DemoBudget,
    data: DemoData,
    num_seeds: int,
    rows: list[dict],
    prepare_seconds,
    start,
) -> dict:
    return {
        "budget": budget.name,
        "task": cfg.task,
        "is_comparison": bool(cfg.compare) and budget.name != "small",
        "run": run_record(cfg, num_seeds),
        "prepare_seconds": prepare_seconds,
        "total_seconds": time.perf_counter() - start,
        "settings": rows,
        "paired_differences": paired_differences(rows),
        "warnings": rm_warnings(rows),
        "task_report": data.report,
    }


COMPARE_SEEDS = 3  # `--compare` without `--seeds`


def run_record(cfg: DemoConfig, num_seeds: int) -> dict:
    """What a rerun needs to give the same numbers: seeds, threads and the versions of the stack."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        segppo_version = version("segppo")
    except PackageNotFoundError:
        segppo_version = "not installed"
    return {
        "seed": cfg.seed,
        "seeds": list(range(cfg.seed, cfg.seed + num_seeds)),
        "threads": torch.get_num_threads(),
        "versions": {
            "segppo": segppo_version,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
    }
