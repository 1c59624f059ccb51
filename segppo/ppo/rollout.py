"""Rollouts and experience: generate responses, score them, and turn scores into advantages.

Every batch has `segppo.data`'s layout (left-padded prompts, right-padded responses starting at
column P), built by the same `collate_responses` that RM training uses, so the reward model reads
PPO's responses exactly as it read its training data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from segppo.data import ChatFormat, EncodedPrompt, ResponseBatch, collate_prompts, collate_responses
from segppo.kernels import SegmentRewards, gae, segment_rewards, sequence_scores
from segppo.models.reward_model import reward_values
from segppo.ppo.losses import kl_penalty, token_rewards
from segppo.rm.scoring import Segmentation
from segppo.segments import logprobs_and_entropy


@dataclass
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    synced_gpus: bool = False  # ZeRO-3 on several ranks: every rank steps until all are done


def cut_at_stop(generated: torch.Tensor, stop_token_ids) -> tuple[list[list[int]], list[bool]]:
    """Each row's response up to and including its own first stop token; `has_eos` per row.

    Rows are cut independently: a row that stopped early never inherits another row's length, and
    one that never stopped keeps all its tokens with `has_eos = False`.
    """
    is_stop = torch.isin(generated, torch.as_tensor(list(stop_token_ids), device=generated.device))
    stopped = is_stop.any(-1)
    lengths = torch.where(stopped, is_stop.int().argmax(-1) + 1, generated.shape[1])
    rows = generated.tolist()
    lengths = lengths.tolist()
    return [row[:n] for row, n in zip(rows, lengths, strict=True)], stopped.tolist()


@torch.no_grad()
def generate(
    model, prompts: list[EncodedPrompt], sampling: SamplingConfig, pad_token_id: int, device
) -> ResponseBatch:
    """Sample one response per prompt (HF `generate`), returned in the response-aligned layout."""
    prompt_ids = [p.prompt_ids for p in prompts]
    batch = collate_prompts(prompt_ids, pad_token_id).to(device)
    module = getattr(model, "module", model)
    out = module.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=list(sampling.stop_token_ids),
        pad_token_id=pad_token_id,
        synced_gpus=sampling.synced_gpus,
    )
    responses, has_eos = cut_at_stop(out[:, batch.input_ids.shape[1] :], sampling.stop_token_ids)
    # An empty response (max_new_tokens reached at once is impossible; kept for safety) has no token
    # to score, so it keeps the pad token as a one-token, EOS-less response.
    responses = [r if r else [pad_token_id] for r in responses]
    return collate_responses(prompt_ids, responses, has_eos, pad_token_id).to(device)


def critic_values(critic, batch: ResponseBatch) -> torch.Tensor:
    """V_t for each response token: the critic's value at column P+t−1, the state before token t."""
    values = reward_values(critic, batch.input_ids, batch.attention_mask, batch.position_ids)
    P, T = batch.prompt_len, batch.response_mask.shape[1]
    return values[:, P - 1 : P + T - 1]


@dataclass
class RewardSetup:
    """How the reward model's outputs become per-token rewards."""

    segmentation: Segmentation
    normalizer: tuple[float, float, float, float] | None
    sigma_floor: float
    distribute: str
    reward_clip: float
    kl_estimator: str
    missing_eos_penalty: float | None
    overlong_penalty: float | None
    max_response_len: int | None
    gamma: float
    lam: float


@dataclass
class Experience:
    batch: ResponseBatch
    logprobs: torch.Tensor  # [B, T] of the policy that generated the batch
    values: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T] (whitened later, over the whole rollout)
    returns: torch.Tensor  # [B, T]
    rewards: torch.Tensor  # [B, T] what GAE saw
    kl: torch.Tensor  # [B, T]
    policy_entropy: torch.Tensor  # [B, T]
    segments: SegmentRewards  # dense normalized rewards, ends, counts
    raw_score: torch.Tensor  # [B] the RM's sequence score (mean value at segment ends)
    reward_seconds: float = 0.0  # time from RM values to advantages (segmentation through GAE)


@torch.no_grad()
def make_experience(
    batch: ResponseBatch,
    *,
    actor,
    critic,
    reference,
    rm_values_fn,
    setup: RewardSetup,
    kl_coef: float,
) -> Experience:
    """Score a rollout batch: log-probs, reference KL and entropy, RM rewards, values, GAE.

    `rm_values_fn(batch) -> [B, T]` gives the reward model's per-token values on the response
    (for a bandit RM with another tokenizer, its score placed at the last token).
    """
    mask, has_eos = batch.response_mask, batch.has_eos
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    logprobs, policy_entropy = logprobs_and_entropy(actor, *args)
    # One pass over the reference's logits: KL log-probs and the segmentation entropy.
    ref_logprobs, ref_entropy = logprobs_and_entropy(reference, *args)
    values = torch.where(mask, critic_values(critic, batch), 0.0)
    rm_values = rm_values_fn(batch)
    # The reward/advantage phase proper: segmentation through GAE (timed for the step's breakdown).
    start = time.perf_counter()
    seg = setup.segmentation
    segments = segment_rewards(
        rm_values,
        ref_entropy,
        mask,
        granularity=seg.granularity,
        threshold=seg.threshold,
        has_eos=has_eos,
        normalizer=setup.normalizer,
        sigma_floor=setup.sigma_floor,
        distribute=setup.distribute,
    )
    raw_score = sequence_scores(
        rm_values, ref_entropy, mask, granularity=seg.granularity, threshold=seg.threshold, has_eos=has_eos
    )
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, setup.kl_estimator), 0.0)
    rewards = token_rewards(
        segments.rewards,
        kl,
        mask,
        has_eos,
        kl_coef=kl_coef,
        reward_clip=setup.reward_clip,
        missing_eos_penalty=setup.missing_eos_penalty,
        overlong_penalty=setup.overlong_penalty,
        max_response_len=setup.max_response_len,
    )
    advantages, returns = gae(rewards, values, mask, gamma=setup.gamma, lam=setup.lam)
    if advantages.is_cuda:
        torch.cuda.synchronize()
    return Experience(
        batch,
        logprobs,
        values,
        advantages,
        returns,
        rewards,
        kl,
        policy_entropy,
        segments,
        raw_score,
        reward_seconds=time.perf_counter() - start,
    )


def shared_rm_values(reward_model):
    """RM values on the response for an RM that shares the policy's tokenizer (and text)."""

    def rm_values(batch: ResponseBatch) -> torch.Tensor:
        values = reward_values(reward_model, batch.input_ids, batch.attention_mask, batch.position_ids)
        return values[:, batch.prompt_len :]

    return rm_values


def foreign_bandit_rm_values(reward_model, rm_chat: ChatFormat, policy_tokenizer, prompts_of, device):
    """A bandit RM with its own tokenizer: decode each response, re-format it with the RM's chat
    format, score it, and place the score at the response's last token in the policy's tokens.

    `prompts_of(batch)` returns the prompt messages of each row.
    """

    def rm_values(batch: ResponseBatch) -> torch.Tensor:
        texts = policy_tokenizer.batch_decode(
            [ids[m].tolist() for ids, m in zip(batch.response_ids, batch.response_mask, strict=True)],
            skip_special_tokens=True,
        )
        encoded = []
        for messages, text in zip(prompts_of(batch), texts, strict=True):
            prompt_ids = rm_chat.prompt_ids(messages)
            response_ids, has_eos = rm_chat.response_ids(messages, text, prompt_ids=prompt_ids)
            encoded.append((prompt_ids, response_ids, has_eos))
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
