"""Metrics of a PPO step (`segppo.ppo.trainer`): rollout means, the critic's explained variance,
throughput and phase shares; each reduced over every rank where it says so."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from segppo.distributed import all_reduce_sum
from segppo.ppo.losses import explained_variance, masked_moments, mean_var
from segppo.ppo.rollout import Experience


def global_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and (population) variance of `x` over every rank's tokens."""
    return mean_var(all_reduce_sum(masked_moments(x, mask)))


def rollout_metrics(experiences: list[Experience], device: torch.device, kl_coef: float) -> dict[str, float]:
    """Means over every rank's responses (`kl_coef`: the KL controller's coefficient, reported as is)."""
    names = (
        "responses",
        "tokens",
        "raw_reward",
        "normalized_reward",
        "kl",
        "entropy",
        "length",
        "segments",
        "eos",
        "nonfinite",
    )
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    for e in experiences:
        mask = e.batch.response_mask
        finite = torch.isfinite(e.rewards).all() & torch.isfinite(e.advantages).all()
        sums += torch.stack(
            [
                torch.tensor(float(mask.shape[0]), device=mask.device),
                mask.sum().float(),
                e.raw_score.sum(),
                e.segments.rewards.sum(),
                e.kl.sum(),
                torch.where(mask, e.policy_entropy, 0.0).sum(),
                mask.sum().float(),
                e.segments.num_segments.sum().float(),
                e.batch.has_eos.sum().float(),
                (~finite).float(),
            ]
        ).double()
    all_reduce_sum(sums)
    s = dict(zip(names, sums.tolist(), strict=True))
    n = max(s["responses"], 1.0)
    return {
        "reward": s["raw_reward"] / n,
        "normalized_reward": s["normalized_reward"] / n,
        "kl": s["kl"] / n,
        "kl_per_token": s["kl"] / max(s["tokens"], 1.0),
        "kl_coef": kl_coef,
        "entropy": s["entropy"] / max(s["tokens"], 1.0),
        "response_length": s["length"] / n,
        "segments": s["segments"] / n,
        "segment_length": s["length"] / max(s["segments"], 1.0),
        "eos_fraction": s["eos"] / n,
        "nonfinite": s["nonfinite"],
        "tokens": s["tokens"],
        "responses": s["responses"],
    }


def rollout_explained_variance(experiences: list[Experience]) -> float:
    """The critic's explained variance of the returns over every rank's response tokens."""
    values = torch.cat([e.values.flatten() for e in experiences])
    returns = torch.cat([e.returns.flatten() for e in experiences])
    mask = torch.cat([e.batch.response_mask.flatten() for e in experiences])
    returns_moments = all_reduce_sum(masked_moments(returns, mask))
    error_moments = all_reduce_sum(masked_moments(returns - values, mask))
    return explained_variance(returns_moments, error_moments)


def throughput(timing: dict[str, float], step_time: float, generated_tokens: float) -> dict[str, float]:
    """Response tokens generated per second (every rank's tokens over this rank's generation time;
    ranks generate in parallel) and the share of the step in generation, scoring (rewards and
    advantages included) and training: what to compare the rollout engines by."""
    out = {"generation_tokens_per_s": generated_tokens / max(timing["generation"], 1e-9)}
    for phase in ("generation", "scoring", "training"):
        out[f"share_{phase}"] = timing[phase] / max(step_time, 1e-9)
    return out


@contextmanager
def timed(timing: dict[str, float], name: str):
    """Record the seconds the block takes as `timing[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[name] = time.perf_counter() - start
