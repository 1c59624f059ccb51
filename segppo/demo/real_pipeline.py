"""`segppo demo --model smollm2`: the method on a real instruct model, with a known gold judge.

    SmolLM2-135M-Instruct (downloaded once, `segppo.demo.smollm2`)
      → preference pairs of its own samples, labelled by VADER sentiment (`segppo.demo.sentiment`)
      → rm train (segment) → fit-normalizer → ppo train → eval by the gold judge on held-out prompts

The same library functions as the commands, with configs built here. What it reports: one held-out
response of the PPO policy split into the RM's segments with their rewards, and the gold gain of
PPO over the starting model on held-out prompts (paired: the same prompts and sampling seeds for
both policies), with its standard error.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from segppo.config import DemoConfig, EvalConfig, FitNormalizerConfig, PPOConfig, RMConfig
from segppo.eval import evaluate
from segppo.fit_normalizer import run_fit_normalizer
from segppo.io import atomic_write_json
from segppo.ppo.trainer import train_ppo
from segppo.rm.trainer import train_reward_model
from segppo.tracking import console, read_metrics

from .pipeline import check_fresh_output
from .real_data import RealData, make_real_data
from .sentiment import gold_scores, sentiment
from .smollm2 import smollm2_folder


@dataclass(frozen=True)
class RealBudget:
    """Sizes of every stage of the real-model demo; defaults are the `default` budget's."""

    name: str = "default"
    # Sized for about 15 minutes on 2 idle CPU cores (a forward and backward of the 135 M model costs
    # ~0.8 GFLOP a token, ~15 s per 1,000 tokens there): generation and the PPO steps take most of it.
    pairs: int = 96  # RM training pairs (two samples of one train prompt each)
    eval_pairs: int = 32  # RM held-out accuracy pairs, on held-out prompts
    ppo_prompts: int = 144  # every train prompt once
    heldout_prompts: int = 48  # every held-out prompt once
    eval_samples: int = 2  # responses per held-out prompt and policy for the gold comparison
    max_new_tokens: int = 32
    max_prompt_len: int = 64  # the template's default system turn (~20 tokens) and the prompt
    generate_batch_size: int = 32
    # The RM's τ is `rm train`'s default, auto: the entropy quantile that gives 3 tokens per segment
    # on this model's samples (τ = 2.0, the paper's Llama value, cut SmolLM2's text into ~1.9-token
    # pieces).
    rm_lr: float = 1e-4
    rm_batch_size: int = 16
    rm_epochs: int = 1
    rm_lora_rank: int = 0  # 0: full fine-tune
    normalizer_pairs: int = 32
    ppo_steps: int = 6
    ppo_rollout_batch_size: int = 16
    ppo_train_batch_size: int = 16
    ppo_micro_batch_size: int = 8
    actor_lr: float = 5e-5
    critic_lr: float = 1e-4
    kl_coef: float = 0.01
    lora_rank: int = 0  # PPO actor and critic; 0: full fine-tune

    @property
    def max_len(self) -> int:
        return self.max_prompt_len + self.max_new_tokens + 1  # an EOS appended to a cut response

    @classmethod
    def small(cls) -> RealBudget:
        """A pipeline check: every stage on a few rows (the gain is noise)."""
        return cls(
            name="small",
            pairs=16,
            eval_pairs=4,
            ppo_prompts=8,
            heldout_prompts=8,
            eval_samples=1,
            max_new_tokens=16,
            rm_batch_size=8,
            normalizer_pairs=8,
            ppo_steps=1,
            ppo_rollout_batch_size=8,
            ppo_train_batch_size=8,
        )


REAL_BUDGETS = {"small": RealBudget.small, "default": RealBudget}


def rm_config(budget: RealBudget, data: RealData, out: Path, seed: int) -> RMConfig:
    return RMConfig(
        model=str(data.policy),
        dataset=str(data.preferences),
        output=str(out / "rm"),
        granularity="segment",
        lr=budget.rm_lr,
        batch_size=budget.rm_batch_size,
        micro_batch_size=budget.rm_batch_size,
        epochs=budget.rm_epochs,
        max_len=budget.max_len,
        max_prompt_len=budget.max_prompt_len,
        lora_rank=budget.rm_lora_rank,
        zero_stage=0,
        warmup_ratio=0.0,
        seed=seed,
    )


def normalizer_config(budget: RealBudget, data: RealData, out: Path, seed: int) -> FitNormalizerConfig:
    return FitNormalizerConfig(
        reward_model=str(out / "rm"),
        dataset=str(data.preferences),
        output=str(out / "rm" / "normalizer.json"),
        samples=budget.normalizer_pairs,
        max_len=budget.max_len,
        max_prompt_len=budget.max_prompt_len,
        batch_size=16,
        into_rm=True,
        seed=seed,
    )


def ppo_config(budget: RealBudget, data: RealData, out: Path, seed: int) -> PPOConfig:
    return PPOConfig(
        policy=str(data.policy),
        reward_model=str(out / "rm"),
        prompts=str(data.prompts_train),
        output=str(out / "ppo"),
        max_prompt_len=budget.max_prompt_len,
        max_new_tokens=budget.max_new_tokens,
        rollout_batch_size=budget.ppo_rollout_batch_size,
        micro_rollout_batch_size=budget.ppo_micro_batch_size,
        train_batch_size=budget.ppo_train_batch_size,
        micro_train_batch_size=budget.ppo_micro_batch_size,
        max_steps=budget.ppo_steps,
        num_episodes=100,
        actor_lr=budget.actor_lr,
        critic_lr=budget.critic_lr,
        kl_coef=budget.kl_coef,
        lora_rank=budget.lora_rank,
        zero_stage=0,
        warmup_ratio=0.0,
        num_logged_samples=4,
        seed=seed,
    )


def eval_config(budget: RealBudget, data: RealData, out: Path, seed: int) -> EvalConfig:
    return EvalConfig(
        policy=[str(data.policy), str(out / "ppo" / "policy")],
        name=["base", "ppo"],
        baseline="base",
        prompts=str(data.prompts_heldout),
        output=str(out / "eval"),
        num_samples=budget.eval_samples,
        max_prompt_len=budget.max_prompt_len,
        max_new_tokens=budget.max_new_tokens,
        batch_size=budget.generate_batch_size,
        plot=False,
        seed=seed,
    )


def paired_gain(base: list[float], ppo: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-response gold difference PPO − base (same prompt and seed)."""
    diffs = [b - a for a, b in zip(base, ppo, strict=True)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se


def example_segments(rm_dir: Path, prompt: str | list[dict], response: str) -> list[dict]:
    """`response` split into the RM's segments, each with its raw and normalized reward."""
    from segppo.rm.evaluate import inspect_response
    from segppo.rm.scoring import load_scorer

    scorer = load_scorer(str(rm_dir))
    return [asdict(view) for view in inspect_response(scorer, prompt, response)]


def run_real_demo(cfg: DemoConfig) -> dict:
    """The whole real-model demo; returns (and writes to `output/results.json`) what it measured."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.budget not in REAL_BUDGETS:
        raise ValueError(f"unknown demo budget {cfg.budget!r}; one of {sorted(REAL_BUDGETS)}")
    budget = REAL_BUDGETS[cfg.budget]()
    out = Path(cfg.output)
    check_fresh_output(out, [out])
    sentiment("")  # the gold judge's package, before any download or training
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}  # all threads: what a busy machine does not inflate
    start, cpu_start = time.perf_counter(), time.process_time()

    def stage(name, fn):
        console.rule(f"[bold]{name}")
        began, cpu_began = time.perf_counter(), time.process_time()
        result = fn()
        seconds[name] = round(time.perf_counter() - began, 1)
        cpu_seconds[name] = round(time.process_time() - cpu_began, 1)
        return result

    folder = stage("model", lambda: smollm2_folder(cfg.cache_dir, log=console.print))
    data = stage(
        "preference data",
        lambda: make_real_data(
            out,
            folder,
            pairs=budget.pairs,
            eval_pairs=budget.eval_pairs,
            ppo_prompts=budget.ppo_prompts,
            heldout_prompts=budget.heldout_prompts,
            max_new_tokens=budget.max_new_tokens,
            batch_size=budget.generate_batch_size,
            seed=cfg.seed,
            log=console.print,
        ),
    )
    stage("rm train", lambda: train_reward_model(rm_config(budget, data, out, cfg.seed)))
    stage("fit-normalizer", lambda: run_fit_normalizer(normalizer_config(budget, data, out, cfg.seed)))
    stage("ppo train", lambda: train_ppo(ppo_config(budget, data, out, cfg.seed)))
    eval_cfg = eval_config(budget, data, out, cfg.seed)
    results = stage("eval", lambda: evaluate(eval_cfg, scorer_fn=gold_scores, progress=False))
    base, ppo = results.policies["base"], results.policies["ppo"]
    order = lambda generations: [(g.messages, g.sample) for g in generations]  # noqa: E731
    if order(base.generations) != order(ppo.generations):
        raise RuntimeError("eval returned the two policies' responses in different orders")
    gain, gain_se = paired_gain(base.scores, ppo.scores)
    # The example: the held-out PPO response the gold judge liked best, split by the RM.
    best = max(ppo.generations, key=lambda g: g.score)
    prompt, response = best.messages[-1]["content"], best.turns[-1]
    segments = example_segments(out / "rm", best.messages, response)
    rm_eval = read_metrics(out / "rm", split="eval")
    summary = {
        "model": "smollm2",
        "budget": asdict(budget),
        "preferences": data.report["preferences"],
        "rm_heldout_accuracy": rm_eval[-1]["accuracy"] if rm_eval else None,
        "base_gold": {"mean": base.score.mean, "se": base.score.se},
        "ppo_gold": {"mean": ppo.score.mean, "se": ppo.score.se},
        "gold_gain": {"mean": gain, "se": gain_se, "responses": len(ppo.scores)},
        "gold_win_rate": ppo.win_rate.to_dict() if ppo.win_rate else None,
        "length": {"base": base.response_length.mean, "ppo": ppo.response_length.mean},
        "example": {"prompt": prompt, "response": response, "gold": best.score, "segments": segments},
        "seconds": seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": cpu_seconds,
        "total_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(),
    }
    atomic_write_json(out / "results.json", summary)
    return summary
