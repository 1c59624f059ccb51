"""PPO with several samples per prompt and the critic-free estimators (rloo, grpo, reinforce++)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_ppo import PROMPTS, ppo_config
from tiny import tiny_rm_config

import segppo.ppo.trainer as trainer_module
from segppo.config import PPOConfig
from segppo.ppo.advantages import advantages_and_returns, group_ids_for, returns_to_go
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


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce++"])
def test_each_critic_free_estimator_trains_end_to_end_on_dense_rewards(
    estimator, tiny_lm_dir, segment_rm, prompts_file, tmp_path, monkeypatch
):
    """One `ppo train` step (2 PPO epochs) on segment rewards: the advantages the loss sees are the
    estimator's, the metrics are finite, the policy moves and no critic exists."""
    rollouts, seen_by_loss = [], []
    real_advantages, real_policy_loss = trainer_module.advantages, trainer_module.policy_loss

    def recording_advantages(experiences, *args, **kwargs):
        out = real_advantages(experiences, *args, **kwargs)
        rollouts.extend(out)
        return out

    def recording_policy_loss(logprobs, old_logprobs, advantages, mask, **kwargs):
        seen_by_loss.append(advantages[mask.bool()].detach().clone())
        return real_policy_loss(logprobs, old_logprobs, advantages, mask, **kwargs)

    monkeypatch.setattr(trainer_module, "advantages", recording_advantages)
    monkeypatch.setattr(trainer_module, "policy_loss", recording_policy_loss)
    cfg = ppo_config(
        tiny_lm_dir,
        segment_rm,
        prompts_file,
        tmp_path / "run",
        advantage=estimator,
        n_samples_per_prompt=2,
        rollout_batch_size=4,  # 4 prompts × 2 samples: one micro-rollout of 8 responses
        micro_rollout_batch_size=8,
        train_batch_size=8,
        micro_train_batch_size=4,
        max_steps=1,
        num_logged_samples=0,
    )
    policy = train_ppo(cfg)

    (metrics,) = read_metrics(cfg.output_dir, split="train")
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    assert metrics["responses"] == 8 and metrics["value_loss"] == 0.0
    before, after = load_file(f"{tiny_lm_dir}/model.safetensors"), load_file(policy / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)
    assert not (cfg.output_dir / "state" / "step-1" / "critic").exists()

    (e,) = rollouts
    mask = e.batch.response_mask
    assert e.values.abs().max() == 0.0  # no critic: no values
    # The estimator's own advantages, recomputed from the rollout (whitened where it whitens).
    group_ids = group_ids_for(8, 2)
    raw, _ = advantages_and_returns(
        estimator,
        e.rewards,
        mask,
        group_ids=group_ids,
        task_rewards=e.task_rewards,
        reward_positions=e.reward_positions,
    )
    if estimator == "grpo":  # not whitened; the group's rewards are z-scored, so their sum is 0
        torch.testing.assert_close(e.advantages, raw)
        kl_to_go = returns_to_go(e.rewards - e.task_rewards, mask)[:, 0]
        first = (e.advantages[:, 0] - kl_to_go).view(4, 2).sum(-1)
        torch.testing.assert_close(first, torch.zeros(4), atol=1e-4, rtol=0)
    else:  # rloo (--whiten-advantages is on by default) and reinforce++: whitened over the rollout
        mean, var = raw[mask].mean(), raw[mask].var(unbiased=False)
        torch.testing.assert_close(e.advantages[mask], (raw[mask] - mean) / torch.sqrt(var + 1e-8))
    assert e.advantages[mask].abs().max() > 0 and bool((e.advantages[~mask] == 0).all())
    # What reached the loss: every response token's advantage, once per PPO epoch.
    sent = torch.sort(torch.cat(seen_by_loss)).values
    expected = torch.sort(e.advantages[mask].repeat(cfg.ppo_epochs)).values
    torch.testing.assert_close(sent, expected)


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
