"""A rollout's experience: score the generated responses, turn scores into rewards and advantages.

Every batch has `segppo.data`'s layout (left-padded prompts, right-padded responses starting at
column P), built by the same `collate_responses` that RM training uses, so the reward model reads
PPO's responses exactly as it read its training data. The three phases are separate functions so
that `ppo_step` reads as the algorithm: `score` (model passes) → `rewards` (segments, KL,
penalties) → `advantages` (GAE, whitening over the whole rollout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from segppo.data import ChatFormat, ResponseBatch, collate_responses
from segppo.generation import SampledScores
from segppo.kernels import SegmentRewards, segment_rewards, sequence_scores
from segppo.models.reward_model import reward_values
from segppo.ppo.advantages import advantages_and_returns, group_ids_for
from segppo.ppo.losses import kl_penalty, token_rewards, whiten
from segppo.rm.scoring import encode_for_reward_model
from segppo.segments import Segmentation, reference_logprobs_and_entropy, response_logprobs_and_entropy


@dataclass
class RewardShaping:
    """How the reward model's outputs and the KL become per-token rewards (GAE's γ, λ are not here)."""

    segmentation: Segmentation
    normalizer: tuple[float, float, float, float] | None
    sigma_floor: float
    distribute: str
    reward_clip: float
    kl_estimator: str
    missing_eos_penalty: float | None
    overlong_penalty: float | None
    max_response_len: int | None


def critic_values(critic, batch: ResponseBatch) -> torch.Tensor:
    """V_t for each response token: the critic's value at column P+t−1, the state before token t."""
    values = reward_values(critic, batch.input_ids, batch.attention_mask, batch.position_ids)
    P, T = batch.prompt_len, batch.response_mask.shape[1]
    return values[:, P - 1 : P + T - 1]


@dataclass
class Experience:
    batch: ResponseBatch
    logprobs: torch.Tensor  # [B, T] of the policy that generated the batch
    ref_logprobs: torch.Tensor  # [B, T]
    ref_entropy: torch.Tensor  # [B, T] the reference's entropy: the segmentation signal
    policy_entropy: torch.Tensor  # [B, T]
    values: torch.Tensor  # [B, T] the critic's (0 without a critic)
    rm_values: torch.Tensor  # [B, T] the reward model's per-token values
    # Filled by `rewards`:
    segments: SegmentRewards | None = None  # dense normalized rewards, ends, counts
    raw_score: torch.Tensor | None = None  # [B] the RM's sequence score (mean value at segment ends)
    kl: torch.Tensor | None = None  # [B, T]
    rewards: torch.Tensor | None = None  # [B, T] what GAE sees: task_rewards − β·kl
    task_rewards: torch.Tensor | None = None  # [B, T] the clipped dense reward plus penalties, no KL
    reward_positions: torch.Tensor | None = None  # [B, T] bool: the tokens that bear task_rewards
    # Filled by `advantages`:
    advantages: torch.Tensor | None = None  # [B, T] whitened over the whole rollout when asked
    returns: torch.Tensor | None = None  # [B, T]


def sampled_logprobs_and_entropy(
    model, batch: ResponseBatch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs `[B, T]` of the response tokens under softmax(logits / temperature), and the
    entropy of the distribution each token was drawn from (logit columns P-1 .. P+T-2).

    The policy-entropy metric: `logprobs_and_entropy`'s entropy is the segmenter's (the distribution
    after each token, columns P .. P+T-1), which includes the one after the stop token (never
    sampled) and misses the first token's.
    """
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    logprobs, entropy = response_logprobs_and_entropy(model, *args, temperature=temperature)
    return logprobs[:, :-1], entropy[:, :-1]


@torch.no_grad()
def score(
    batch: ResponseBatch,
    *,
    actor,
    critic,
    reference,
    rm_values_fn,
    temperature: float = 1.0,
    sampled: SampledScores | None = None,
) -> Experience:
    """The model passes over a generated batch: log-probs, reference log-probs and entropy, values.

    `rm_values_fn(batch) -> [B, T]` gives the reward model's per-token values on the response
    (for a bandit RM with another tokenizer, its score placed at the last token). Log-probs (hence
    ratios and KL) are at the sampling `temperature`, the distribution the tokens were drawn from;
    the segmentation entropy is at temperature 1, as the RM's segmenter computed it. `sampled`:
    the actor's log-probs and entropy as sampling computed them (`HFEngine.generate_scored`), which
    then need no forward pass of the actor here.
    """
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    if sampled is None:
        logprobs, policy_entropy = sampled_logprobs_and_entropy(actor, batch, temperature)
    else:
        logprobs, policy_entropy = sampled.logprobs, sampled.entropy
    # The reference's KL log-probs (at the sampling temperature) and segmentation entropy (at 1).
    ref_logprobs, ref_entropy = reference_logprobs_and_entropy(reference, *args, temperature=temperature)
    if critic is None:  # a critic-free estimator: no values (advantages come from returns-to-go)
        values = torch.zeros(batch.response_mask.shape, device=batch.response_mask.device)
    else:
        values = torch.where(batch.response_mask, critic_values(critic, batch), 0.0)
    return Experience(batch, logprobs, ref_logprobs, ref_entropy, policy_entropy, values, rm_values_fn(batch))


def reward_positions(
    segments: SegmentRewards, response_mask: torch.Tensor, shaping: RewardShaping
) -> torch.Tensor:
    """`[B, T]` bool: the tokens the task reward is placed on, what the group estimators' statistics
    run over: every token of a segment (`interpolate`, `repeat`), or the segment ends (`end`, and
    bandit, whose one reward `segment_rewards` puts on the last token); plus the last token when a
    penalty is set (each response's penalty, 0 or not, is one reward of the group)."""
    ends = segments.ends
    if shaping.segmentation.granularity == "bandit" or shaping.distribute == "end":
        positions = ends.clone()
    else:  # every token up to the last segment end (a trailing EOS is in no segment)
        positions = ends.flip(-1).long().cumsum(-1).flip(-1) > 0
    mask = response_mask.bool()
    if shaping.missing_eos_penalty is not None or shaping.overlong_penalty is not None:
        length = mask.sum(-1)
        rows = torch.nonzero(length > 0).flatten()
        positions[rows, length[rows] - 1] = True
    return positions & mask


@torch.no_grad()
def rewards(exp: Experience, shaping: RewardShaping, kl_coef: float) -> Experience:
    """Dense segment rewards (`segment_rewards`), clipped, minus β·KL, plus the penalties; the task
    rewards (the same without the KL) and their positions, for the group estimators."""
    mask, has_eos, seg = exp.batch.response_mask, exp.batch.has_eos, shaping.segmentation
    exp.segments = segment_rewards(
        exp.rm_values,
        exp.ref_entropy,
        mask,
        granularity=seg.granularity,
        threshold=seg.threshold,
        has_eos=has_eos,
        normalizer=shaping.normalizer,
        sigma_floor=shaping.sigma_floor,
        distribute=shaping.distribute,
    )
    exp.raw_score = sequence_scores(
        exp.rm_values,
        exp.ref_entropy,
        mask,
        granularity=seg.granularity,
        threshold=seg.threshold,
        has_eos=has_eos,
    )
    exp.kl = torch.where(mask, kl_penalty(exp.logprobs, exp.ref_logprobs, shaping.kl_estimator), 0.0)
    shaped = dict(
        reward_clip=shaping.reward_clip,
        missing_eos_penalty=shaping.missing_eos_penalty,
        overlong_penalty=shaping.overlong_penalty,
        max_response_len=shaping.max_response_len,
    )
    exp.rewards = token_rewards(exp.segments.rewards, exp.kl, mask, has_eos, kl_coef=kl_coef, **shaped)
    exp.task_rewards = token_rewards(exp.segments.rewards, exp.kl, mask, has_eos, kl_coef=0.0, **shaped)
    exp.reward_positions = reward_positions(exp.segments, mask, shaping)
    return exp


@torch.no_grad()
def advantages(
    experiences: list[Experience],
    estimator: str = "gae",
    *,
    n_samples_per_prompt: int = 1,
    gamma: float,
    lam: float,
    whiten_with=None,
) -> list[Experience]:
    """`estimator`'s advantages per batch (`advantages_and_returns`; a batch holds whole groups of
    `n_samples_per_prompt` consecutive rows); `whiten_with(advantages, mask) -> (mean, var)` (every
    rank's tokens) whitens."""
    for e in experiences:
        e.advantages, e.returns = advantages_and_returns(
            estimator,
            e.rewards,
            e.batch.response_mask,
            values=e.values,
            group_ids=group_ids_for(e.rewards.shape[0], n_samples_per_prompt),
            task_rewards=e.task_rewards,
            reward_positions=e.reward_positions,
            gamma=gamma,
            lam=lam,
        )
    if whiten_with is not None:
        adv = torch.cat([e.advantages.flatten() for e in experiences])
        mask = torch.cat([e.batch.response_mask.flatten() for e in experiences])
        mean, var = whiten_with(adv, mask)
        for e in experiences:
            e.advantages = whiten(e.advantages, e.batch.response_mask, mean, var)
    return experiences


def shared_rm_values(reward_model):
    """RM values on the response for an RM that shares the policy's tokenizer (and text)."""

    def rm_values(batch: ResponseBatch) -> torch.Tensor:
        values = reward_values(reward_model, batch.input_ids, batch.attention_mask, batch.position_ids)
        return values[:, batch.prompt_len :]

    return rm_values


def foreign_rm_inputs(
    rm_chat: ChatFormat, policy_chat: ChatFormat, prompts: list, batch: ResponseBatch
) -> list:
    """(prompt ids, response ids, has_eos) per row of `batch` in the RM's tokens: each response's
    content text (`ChatFormat.response_text`, so no template text leaks into it) re-encoded as
    eval does (`encode_for_reward_model`): the ids RM training would have made of that text."""
    rows = zip(prompts, batch.response_ids, batch.response_mask, batch.has_eos.tolist(), strict=True)
    encoded = []
    for messages, ids, mask, has_eos in rows:
        text = policy_chat.response_text(messages, ids[mask].tolist(), has_eos)
        encoded.append(encode_for_reward_model(rm_chat, messages, text, has_eos))
    return encoded


def foreign_bandit_rm_values(reward_model, rm_chat: ChatFormat, policy_chat: ChatFormat, prompts_of, device):
    """A bandit RM with its own tokenizer: re-encode each response for it (`foreign_rm_inputs`),
    score it, and place the score at the response's last token in the policy's tokens.

    `prompts_of(batch)` returns the prompt messages of each row.
    """

    def rm_values(batch: ResponseBatch) -> torch.Tensor:
        encoded = foreign_rm_inputs(rm_chat, policy_chat, prompts_of(batch), batch)
        rm_batch = collate_responses(*zip(*encoded, strict=True), rm_chat.pad_token_id).to(device)
        values = reward_values(
            reward_model, rm_batch.input_ids, rm_batch.attention_mask, rm_batch.position_ids
        )
        last = rm_batch.prompt_len + rm_batch.response_mask.sum(-1) - 1
        scores = values.gather(1, last[:, None]).squeeze(1)
        out = torch.zeros(batch.response_mask.shape, device=device)
        end = (batch.response_mask.sum(-1) - 1).clamp(min=0)
        return out.scatter(1, end[:, None], scores[:, None])

    return rm_values
