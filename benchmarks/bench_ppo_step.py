"""Time per PPO step on a tiny model on CPU, split by phase (issue 5's target: the reward/advantage
phase, segmentation through GAE, at most 2% of a step).

A tiny random Llama policy (tests/tiny.py), a segment RM trained for a few steps on the Paris/Lyon
preference set, 64 prompts per rollout, 32 new tokens, one PPO epoch. The timed unit is a whole
`train_ppo` run of `SEGPPO_BENCH_PPO_STEPS` steps (default 6); the per-phase split comes from the
run's metrics.jsonl (`time_generation`, `time_scoring`, `time_rewards`, `time_training`), with the
first step (warm-up) left out.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import save_tiny_lm, tiny_rm_config, write_preferences  # noqa: E402

from segppo.config import PPOConfig  # noqa: E402
from segppo.ppo.trainer import train_ppo  # noqa: E402
from segppo.rm.trainer import train_reward_model  # noqa: E402
from segppo.tracking import read_metrics  # noqa: E402

STEPS = int(os.environ.get("SEGPPO_BENCH_PPO_STEPS", "6"))
THREADS = int(os.environ.get("SEGPPO_BENCH_THREADS", "1"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(THREADS)
    root = tmp_path_factory.mktemp("ppo_bench")
    policy = save_tiny_lm(root / "policy")
    prefs = write_preferences(root / "prefs.jsonl")
    train_reward_model(tiny_rm_config(policy, prefs, root / "rm", max_steps=10))
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Name the capital, number {i}."}) + "\n" for i in range(512))
    )
    return root, policy, str(root / "rm"), str(prompts)


def test_ppo_step_phases(benchmark, setup):
    root, policy, rm, prompts = setup
    runs = iter(range(1000))

    def run():
        out = root / f"run{next(runs)}"
        cfg = PPOConfig(
            policy=policy,
            reward_model=rm,
            prompts=prompts,
            output=str(out),
            rollout_batch_size=64,
            micro_rollout_batch_size=64,
            train_batch_size=64,
            micro_train_batch_size=32,
            max_new_tokens=32,
            max_prompt_len=48,
            max_steps=STEPS,
            zero_stage=0,
            critic_init="sft",
            actor_lr=1e-4,
            seed=0,
        )
        train_ppo(cfg)
        return out

    out = benchmark.pedantic(run, rounds=1, iterations=1)
    rows = read_metrics(out, split="train")[1:]  # the first step warms caches up
    phases = {
        k: statistics.fmean(r[f"time_{k}"] for r in rows)
        for k in ("step", "generation", "scoring", "rewards", "training")
    }
    share = phases["rewards"] / phases["step"]
    benchmark.extra_info.update({f"{k}_s": v for k, v in phases.items()})
    benchmark.extra_info["rewards_share_of_step"] = share
    benchmark.extra_info["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in rows)
    print(
        "\nPPO step (mean over steps 2..{}): {:.3f}s = generation {:.3f}s + scoring {:.3f}s "
        "(of which rewards/advantages {:.4f}s, {:.2%} of the step) + training {:.3f}s".format(
            STEPS,
            phases["step"],
            phases["generation"],
            phases["scoring"],
            phases["rewards"],
            share,
            phases["training"],
        )
    )
