"""PPO's small pure functions: token rewards, KL, losses, whitening, KL control.

Per-token tensors are `[B, T]` on response tokens with a `mask` of the same shape. Losses return
the *sum* over the batch's tokens (token-mean) or of each sequence's token mean (seq-mean) scaled by
`scale`, so that a caller can normalise by the token or sequence count of the whole optimizer step
(`loss_denominator`, see `segppo.ppo.trainer`): a mean that does not depend on how samples are
grouped into micro-batches or ranks. Statistics over every rank's tokens are taken
from `masked_moments` that the caller has summed over ranks: nothing here communicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from segppo.config import LOSS_AGGREGATIONS


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of π against π_ref at the sampled tokens (Schulman's k1 or k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # exp(ref − logπ) − (ref − logπ) − 1 ≥ 0
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def token_rewards(
    dense: torch.Tensor,
    kl: torch.Tensor,
    response_mask: torch.Tensor,
    has_eos: torch.Tensor,
    *,
    kl_coef: float,
    reward_clip: float,
    missing_eos_penalty: float | None = None,
    overlong_penalty: float | None = None,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """`clip(dense, ±reward_clip) − β·kl` per token, plus penalties once at the last response token.

    The missing-EOS penalty applies to responses cut off without a stop token; the overlong
    penalty to responses of more than `max_response_len` response tokens (their own length,
    whatever the prompt's length or padding). Both are added (they are usually negative).
    """
    mask = response_mask.bool()
    rewards = dense.clamp(-reward_clip, reward_clip) - kl_coef * kl
    length = mask.sum(-1)
    extra = torch.zeros_like(length, dtype=rewards.dtype)
    if missing_eos_penalty is not None:
        extra = extra + torch.where(has_eos.bool(), 0.0, missing_eos_penalty)
    if overlong_penalty is not None:
        if max_response_len is None:
            raise ValueError("an overlong penalty needs max_response_len")
        extra = extra + torch.where(length > max_response_len, overlong_penalty, 0.0)
    last = (length - 1).clamp(min=0)
    rewards = rewards.scatter_add(1, last[:, None], (extra * (length > 0))[:, None])
    return torch.where(mask, rewards, torch.zeros((), device=rewards.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), device=x.device)).sum()


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[Σx, Σx², count]` float64 over the masked tokens: sum it over ranks, then `mean_var`."""
    return torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum().to(x.dtype)]).double()


def mean_var(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) variance from `masked_moments` (summed over every rank's tokens)."""
    total, total_sq, count = moments.tolist()
    count = max(count, 1.0)
    mean = total / count
    return torch.tensor(mean), torch.tensor(max(total_sq / count - mean * mean, 0.0))


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    out = (x - mean.to(x)) * torch.rsqrt(var.to(x) + 1e-8)
    return torch.where(mask.bool(), out, torch.zeros((), device=x.device))


# |log π − log π_old| beyond this is clamped before `exp` (as verl does): e^20 ≈ 5·10⁸ is far outside
# any clip range yet finite in float32 and bf16, where one token at e^89 would make the loss infinite.
LOG_RATIO_LIMIT = 20.0


def loss_denominator(response_lengths: list[int], agg: str) -> float:
    """What one optimizer step's loss is averaged over: its tokens (token-mean) or sequences (seq-mean).

    The caller takes it over every rank's rows of the step, so that the loss does not depend on
    how they are split into micro-batches or ranks.
    """
    if agg == "token-mean":
        return float(sum(response_lengths))
    if agg == "seq-mean":
        return float(len(response_lengths))
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {agg!r}")


def _aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str, scale: float) -> torch.Tensor:
    """Σ over tokens (token-mean) or Σ over sequences of each one's token mean (seq-mean), × `scale`."""
    loss_denominator([], agg)  # validates `agg`
    masked = torch.where(mask.bool(), loss, torch.zeros((), device=loss.device))
    if agg == "token-mean":
        return masked.sum() * scale
    lengths = mask.sum(-1).clamp(min=1).to(loss.dtype)  # an empty response contributes 0
    return (masked.sum(-1) / lengths).sum() * scale


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
    scale: float,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate `max(−A·r, −A·clip(r, 1−ε, 1+ε_high))`, aggregated by `agg`, × `scale`.

    `clip_high` is ε_high (default ε). With `dual_clip` C > 1 the loss of a token with A < 0 is
    at most C·|A| (Ye et al., 2020; OpenRLHF's and verl's dual clip). Metrics are token sums.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    high = clip if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        bound = -dual_clip * advantages  # C·|A| where A < 0
        dual_clipped = (advantages < 0) & (loss > bound)
        loss = torch.where(dual_clipped, bound, loss)
    log_ratio = log_ratio.detach()
    stats = {
        "policy_loss": masked_sum(loss.detach(), mask),
        "policy_clipfrac": masked_sum((clipped > unclipped).float(), mask),
        "policy_dual_clipfrac": masked_sum(dual_clipped.float(), mask),
        "approx_kl": masked_sum(torch.expm1(log_ratio) - log_ratio, mask),
    }
    return _aggregate(loss, mask, agg, scale), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
    scale: float,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss `½·max((V−R)², (V_clip−R)²)`, aggregated by `agg`, × `scale`."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped)
    stats = {
        "value_loss": masked_sum(loss.detach(), mask),
        "value_clipfrac": masked_sum((clipped > unclipped).float(), mask),
    }
    return _aggregate(loss, mask, agg, scale), stats


def explained_variance(returns_moments: torch.Tensor, error_moments: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) from the `masked_moments` of R and of R − V (1 is a perfect critic)."""
    _, var_returns = mean_var(returns_moments)
    _, var_error = mean_var(error_moments)
    return float("nan") if var_returns.item() == 0 else 1.0 - var_error.item() / var_returns.item()


@dataclass
class KLController:
    """β for the KL penalty: fixed, or adaptive towards `target` (Ziegler et al., 2019)."""

    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, num_samples: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * num_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])
