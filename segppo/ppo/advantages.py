"""Advantage estimators: GAE with a critic, and critic-free RLOO, GRPO and REINFORCE++ on dense rewards.

Inputs are the per-token rewards PPO already builds (`[B, T]`: the clipped dense segment/token/bandit
reward minus β·KL, penalties included) and the response mask. The critic-free estimators start from
the **returns-to-go** of those rewards,

    G_t = Σ_{s ≥ t} γ^(s−t) · r_s          (0 outside the response)

and the group baselines act on them. A group is the n samples of one prompt. Each sample's baseline
is computed from its group's **sequence returns** `G_0` (the whole discounted return of each
sample) and subtracted from every token's return-to-go of that sample:

    rloo         A_t = G_t − mean_{j ≠ i} G_0^(j)                   (leave-one-out, n ≥ 2)
    grpo         A_t = (G_t − mean_j G_0^(j)) / (std_j G_0^(j) + 1e-6)   (std unbiased, n ≥ 2)
    reinforce++  A_t = G_t, then whitened over the whole rollout batch (no group baseline)

Why a per-sample constant taken from `G_0` rather than a per-position baseline: responses of one
group differ in length, so position `t` means different things in different samples; and the
constant makes bandit rewards reduce exactly to the usual estimators for any lengths. With a bandit
reward `R` at the last token, γ = 1 and no KL, `G_t = R` at every token, so rloo gives
`R_i − mean_{j≠i} R_j` (RLOO, Ahmadian et al. 2024), grpo `(R_i − mean R)/(std R + ε)` (GRPO, Shao
et al. 2024) and reinforce++ the whitened `R` (Hu 2025). RLOO's baseline never uses the sample
itself, so its gradient stays unbiased; GRPO's mean includes it, as GRPO does.

Conventions followed: verl's `core_algos` (GRPO: `torch.std`, unbiased, ε = 1e-6; RLOO:
`score·n/(n−1) − mean·n/(n−1)`, the leave-one-out mean; REINFORCE++: the masked reverse
accumulation of the token rewards, then whitening over the batch), whose group statistics are
taken, as here, from the sum of the token-level rewards *with* the KL penalty in them. OpenRLHF's
take differs only in where the KL goes: it forms the baseline from the RM score before adding the
per-token KL. Whitening (`whitens`) follows OpenRLHF: every estimator but GRPO may be whitened;
REINFORCE++ always is (it is defined by that normalisation); GRPO's group normalisation replaces it.

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


def _group_stats(
    sequence_returns: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: its group's sum and size, and the group's unbiased std of `sequence_returns`."""
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], dtype=sequence_returns.dtype, device=sequence_returns.device)
    sums = sums.index_add(0, index, sequence_returns)
    size = counts.to(sequence_returns)[index]
    mean = sums[index] / size
    sq = torch.zeros_like(sums).index_add(0, index, (sequence_returns - mean) ** 2)
    std = torch.sqrt(sq[index] / (size - 1).clamp(min=1))
    return sums[index], size, std


def advantages_and_returns(
    estimator: str,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(advantages, returns)`, float32 `[B, T]`, 0 outside the response; not whitened (see `whitens`).

    `gae` needs the critic's `values` and returns `A + V` (DESIGN §3.5). The critic-free estimators
    return the returns-to-go `G_t` as `returns` (for metrics; there is no critic to fit) and need
    no values; `rloo`/`grpo` need `group_ids` ([B], equal ids = samples of one prompt, every group
    of at least 2; see `group_ids_for`).
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
    sequence_returns = returns[:, 0] if returns.shape[1] else returns.new_zeros(returns.shape[0])
    sums, size, std = _group_stats(sequence_returns, group_ids.to(returns.device))
    if bool((size < 2).any()):
        raise ValueError(f"{estimator} needs at least 2 samples in every group (n_samples_per_prompt >= 2)")
    if estimator == "rloo":
        baseline = (sums - sequence_returns) / (size - 1)  # the mean of the *other* samples
        advantages = returns - baseline[:, None]
    else:  # grpo
        advantages = (returns - (sums / size)[:, None]) / (std[:, None] + GRPO_EPS)
    return torch.where(mask, advantages, torch.zeros((), device=mask.device)), returns


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
