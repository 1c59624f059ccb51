"""PPO with several samples per prompt and the critic-free estimators (rloo, grpo, reinforce++)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_ppo import PROMPTS, ppo_config
from tiny import tiny_rm_config

from segppo.config import PPOConfig
from segppo.ppo.trainer import train_ppo
from segppo.rm.trainer import train_reward_model
from segppo.tracking import read_metrics


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS * 40) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def segment_rm(tiny_lm_dir, preferences_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_segment") / "run"
    train_reward_model(
        tiny_rm_config(tiny_lm_dir, preferences_file, out, granularity="segment", max_steps=20)
    )
    return str(out)


def test_rloo_with_two_samples_per_prompt_trains_without_a_critic(
    tiny_lm_dir, segment_rm, prompts_file, tmp_path
):
    # 8 prompts × 2 samples = 16 responses per rollout, two micro-rollouts of 4 prompts × 2.
    cfg = ppo_config(
        tiny_lm_dir,
        segment_rm,
        prompts_file,
        tmp_path / "run",
        advantage="rloo",
        n_samples_per_prompt=2,
        rollout_batch_size=8,
        micro_rollout_batch_size=8,
        num_logged_samples=8,
        normalize=False,
    )
    policy = train_ppo(cfg)
    metrics = read_metrics(cfg.output_dir, split="train")
    assert len(metrics) == 2
    assert all(m["responses"] == 16 for m in metrics)
    assert metrics[0]["reward"] != metrics[1]["reward"]
    assert metrics[-1]["value_loss"] == 0.0 and "explained_variance" not in metrics[-1]
    assert "critic_lr" not in metrics[-1]
    for m in metrics:  # throughput: tokens generated per second and each phase's share of the step
        assert m["generation_tokens_per_s"] == pytest.approx(m["tokens"] / m["time_generation"])
        shares = [m[f"share_{phase}"] for phase in ("generation", "scoring", "training")]
        assert all(0 < x < 1 for x in shares) and 0.9 < sum(shares) <= 1.0, shares
    # The policy moved away from the SFT model.
    before, after = load_file(f"{tiny_lm_dir}/model.safetensors"), load_file(policy / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)
    # No critic was built, so none is saved.
    state = cfg.output_dir / "state" / "step-2"
    assert (state / "actor").is_dir() and not (state / "critic").exists()
    # A prompt's two samples are consecutive rows.
    samples = [json.loads(line) for line in (cfg.output_dir / "samples.jsonl").read_text().splitlines()]
    first_step = [s["prompt"] for s in samples if s["step"] == 1]
    assert len(first_step) == 8
    assert all(first_step[i] == first_step[i + 1] for i in range(0, 8, 2))


def test_grpo_with_one_sample_per_prompt_is_an_error():
    with pytest.raises(ValueError, match="--advantage grpo needs --n-samples-per-prompt >= 2"):
        PPOConfig(policy="p", reward_model="r", prompts="x", output="o", advantage="grpo")


def test_micro_rollouts_hold_whole_groups():
    cfg = PPOConfig(
        policy="p",
        reward_model="r",
        prompts="x",
        output="o",
        advantage="rloo",
        n_samples_per_prompt=4,
        rollout_batch_size=8,
        micro_rollout_batch_size=6,
        train_batch_size=8,
    )
    with pytest.raises(
        ValueError, match="--micro-rollout-batch-size 6 .* multiple of --n-samples-per-prompt 4"
    ):
        cfg.batch_layout(1)
    # rollout_batch_size counts prompts: 8 prompts × 4 samples = 32 responses, 16 per rank.
    ok = PPOConfig(**{**cfg.__dict__, "micro_rollout_batch_size": 8})
    assert ok.responses_per_rollout == 32 and ok.batch_layout(2) == (16, 1)
