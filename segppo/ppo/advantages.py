r"""Advantage estimators: GAE with a critic, and critic-free RLOO, GRPO and REINFORCE++ on dense rewards.

Inputs are the per-token rewards PPO already builds (`[B, T]`: `r_t = s_t − β·kl_t`, where `s_t` is
the *task reward*: the clipped dense segment/token/bandit reward, penalties included) and the
response mask; the group estimators also take `s` itself and the positions that bear it (the
tokens the reward model's reward is placed on: every token of a segment with `interpolate` or
`repeat`, the segment ends with `end`, the last token for bandit; the last token too when a
penalty is set). The critic-free estimators are returns-to-go,

    G_t = Σ_{s ≥ t} γ^(s−t) · x_s          (0 outside the response)

of a per-token quantity `x`. A group is the n samples of one prompt; P its reward-bearing tokens.

    reinforce++  x = r, then whitened over the whole rollout batch (no group baseline)
    grpo         x_t = (s_t − mean_P s) / (std_P s + 1e-6) on P, 0 elsewhere; then − β·kl_t
    rloo         x_t = s_t − mean_{P \ sample i} s            on P, 0 elsewhere; then − β·kl_t

(std unbiased; "mean_{P \ sample i}" is the mean over the other samples' reward-bearing tokens.)

Why this form. GRPO's paper (Shao et al. 2024, DeepSeekMath §4.1.3) defines it for step rewards
("process supervision"): every reward of the group is normalised by the mean and std of *all* the
group's rewards, and a token's advantage is the sum of the normalised rewards from its step on.
segppo's dense rewards are such step rewards; with `--distribute end` this is that definition
exactly, and with `interpolate`/`repeat` each token's share is one reward of the group. Baseline
and quantity are then the same thing (a reward against the group's rewards), so a group whose
rewards have ~0 spread gets ~0 advantage, and |x| is bounded by GRPO's z-score bound
((N−1)/√N for N rewards) however small the spread: no 1/ε. The earlier form, a per-sample
baseline from the sequence returns `G_0` subtracted from every `G_t`, compared different
quantities: for t > 0 the numerator did not vanish when the group's totals tied, while the
denominator did (two identical samples with rewards [1, −1, 0.5, 0] got advantages −1e6).
RLOO (Kool et al. 2019; Ahmadian et al. 2024) is the same construction with the leave-one-out
mean and no std: the baseline never uses sample i's own rewards, so it stays unbiased (PRIME,
Cui et al. 2025, applies it to dense implicit process rewards the same way, per token, then
returns-to-go). REINFORCE++ (Hu 2025) has no group baseline: the returns-to-go of the token
rewards, KL included, are whitened over the batch, which is again one quantity; it is unchanged.

What follows from it. A sample's first-token advantage compares the whole sample with the group:
identical samples get exactly 0 there; later tokens carry the sample's own credit (its rewards to
come against the group's mean reward), which is the point of dense rewards and is 0 only when all
the group's rewards are equal. With one reward per sample (bandit) the estimators are the usual
ones for any lengths: every token gets `(R_i − mean R)/(std R + ε)` (GRPO) or `R_i − mean_{j≠i} R_j`
(RLOO). With `interpolate`, a token's share compares with the group's mean share, so at equal
totals a shorter response scores higher when the mean reward is positive (normalised rewards are
centred, which keeps this small).

The KL penalty is not normalised and gets no group baseline: its tokens are not reward-bearing,
and z-scoring it would turn 1e-4 of KL noise into unit advantages. As in OpenRLHF (the group
baseline is taken on the reward model's score, then the per-token KL is added and returns-to-go
taken), `−β·kl_t` joins `x` unchanged; a bandit reward plus a KL penalty therefore gives the bandit
advantages plus the KL's own return-to-go. (GRPO's paper puts the KL in the loss instead.)

verl's `grpo` and `rloo` (`core_algos.compute_grpo_outcome_advantage`, `compute_rloo_outcome_advantage`)
are outcome estimators: they sum each sample's token rewards into one score, baseline it within
the group, and give *every* token of the sample that one value (no returns-to-go, so no credit
within the sample); on bandit rewards without KL they agree with these. verl's `reinforce_plus_plus`
is the same masked reverse accumulation and whitening as here.

Whitening (`whitens`) follows OpenRLHF: every estimator but GRPO may be whitened; REINFORCE++ always
is (it is defined by that normalisation); GRPO's group normalisation replaces it.

Groups must not straddle ranks: the n samples of a prompt are generated and scored on one rank.
"""

from __future__ import annotations

import torch

from segppo.config import ESTIMATORS, GROUP_ESTIMATORS  # noqa: F401 (re-exported)
from segppo.kernels import gae

GRPO_EPS = 1e-6


def group_ids_for(batch_size: int, n_samples_per_prompt: int) -> torch.Tensor:
    """[B] group id of each row when the n samples of each prompt are consecutive rows."""
    if n_samples_per_prompt < 1 or batch_size % n_samples_per_prompt:
        raise ValueError(
            f"batch of {batch_size} rows is not a whole number of groups of {n_samples_per_prompt} samples"
        )
    return torch.arange(batch_size) // n_samples_per_prompt


def returns_to_go(rewards: torch.Tensor, response_mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """`G_t = Σ_{s≥t} γ^(s−t) r_s` over the response, float32, 0 outside it.

    This is GAE with a zero critic and λ = 1 (δ_t = r_t), so it shares the GAE kernel.
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards), response_mask, gamma=gamma, lam=1.0)
    return returns


def _centred_task_rewards(
    estimator: str, task_rewards: torch.Tensor, positions: torch.Tensor, group_index: torch.Tensor
) -> torch.Tensor:
    """`x_t` without the KL: each reward-bearing token's task reward against its group's rewards
    (grpo: z-score over the group's rewards; rloo: minus the mean of the other samples' rewards), 0
    elsewhere. `group_index` [B]: the group of each row, 0..G−1. Statistics in float64, so that equal
    rewards give exactly 0."""
    s = torch.where(positions, task_rewards.double(), 0.0)
    groups = int(group_index.max()) + 1 if group_index.numel() else 0

    def group_total(per_row: torch.Tensor) -> torch.Tensor:  # each row gets its group's total
        totals = per_row.new_zeros(groups).index_add(0, group_index, per_row)
        return totals[group_index]

    row_count, row_sum = positions.sum(-1).double(), s.sum(-1)
    count, total = group_total(row_count), group_total(row_sum)
    if estimator == "rloo":
        baseline = (total - row_sum) / (count - row_count).clamp(min=1)  # no other rewards: 0
        centred = s - baseline[:, None]
    else:  # grpo
        deviation = s - (total / count.clamp(min=1))[:, None]
        squares = group_total(torch.where(positions, deviation, 0.0).pow(2).sum(-1))
        std = torch.sqrt(squares / (count - 1).clamp(min=1))
        centred = deviation / (std[:, None] + GRPO_EPS)
    return torch.where(positions, centred, 0.0).to(task_rewards.dtype)


def advantages_and_returns(
    estimator: str,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    task_rewards: torch.Tensor | None = None,
    reward_positions: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(advantages, returns)`, float32 `[B, T]`, 0 outside the response; not whitened (see `whitens`).

    `gae` needs the critic's `values` and returns `A + V` (DESIGN §3.5). The critic-free estimators
    return the returns-to-go `G_t` of `rewards` as `returns` (for metrics; there is no critic to fit)
    and need no values. `rloo`/`grpo` need `group_ids` ([B], equal ids = samples of one prompt, every
    group of at least 2; see `group_ids_for`), `task_rewards` (the part of `rewards` without the KL
    penalty) and `reward_positions` (the tokens that bear it); `rewards − task_rewards` is the KL part.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if rewards.shape != response_mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    mask = response_mask.bool()
    if estimator == "gae":
        if values is None:
            raise ValueError("the gae estimator needs the critic's values")
        return gae(rewards, values, mask, gamma=gamma, lam=lam)

    returns = returns_to_go(rewards, mask, gamma=gamma)
    if estimator == "reinforce++":
        return returns.clone(), returns

    if group_ids is None or group_ids.shape != (rewards.shape[0],):
        raise ValueError(f"{estimator} needs group_ids of shape [{rewards.shape[0]}] (one id per row)")
    if task_rewards is None or reward_positions is None:
        raise ValueError(
            f"{estimator} needs the task rewards and their positions (task_rewards, reward_positions)"
        )
    for name, tensor in (("task_rewards", task_rewards), ("reward_positions", reward_positions)):
        if tensor.shape != rewards.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} and rewards {tuple(rewards.shape)} differ")
    _, group_index, sizes = torch.unique(
        group_ids.to(rewards.device), return_inverse=True, return_counts=True
    )
    if bool((sizes < 2).any()):
        raise ValueError(f"{estimator} needs at least 2 samples in every group (n_samples_per_prompt >= 2)")
    positions = reward_positions.bool() & mask
    kl_part = torch.where(mask, rewards - task_rewards, 0.0)  # the −β·kl of each token, unnormalised
    x = _centred_task_rewards(estimator, task_rewards, positions, group_index) + kl_part
    return returns_to_go(x, mask, gamma=gamma), returns


def whitens(estimator: str, whiten_advantages: bool) -> bool:
    """Whether the estimator's advantages are whitened over the rollout batch (across ranks).

    REINFORCE++ always (its normalisation is what makes it work without a critic or a group);
    GRPO never (its group normalisation takes that place); GAE and RLOO as --whiten-advantages says.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return {"reinforce++": True, "grpo": False}.get(estimator, whiten_advantages)


def needs_critic(estimator: str) -> bool:
    """Only GAE has a critic; the others take their baseline from the returns (no value model)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator == "gae"
