"""Packed rows give the same per-token outputs and losses as the padded layout (DESIGN §2)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from segppo.data.chat import EncodedPair
from segppo.data.collate import collate_preferences, collate_responses
from segppo.data.packing import (
    first_fit_decreasing,
    pack_preferences,
    pack_response_batch,
    pack_responses,
    packed_critic_values,
    packed_entropy,
    packed_logprobs_and_entropy,
    packed_reward_values,
    padded_tokens,
)
from segppo.kernels import sequence_scores
from segppo.models.reward_model import reward_values
from segppo.ppo.rollout import critic_values
from segppo.rm.loss import bradley_terry_loss
from segppo.segments import logprobs_and_entropy
from tests.tiny import tiny_config

PAD = 0
ARCHS = ("llama", "qwen2", "gpt_neox")
MODES = ("mask", "varlen")


def _sequences(n: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 300) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    responses = [[rng.randrange(4, 300) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    has_eos = [rng.random() < 0.5 for _ in range(n)]
    return prompts, responses, has_eos


@pytest.fixture(scope="module", params=ARCHS)
def models(request):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config(request.param), attn_implementation="sdpa").eval()
    rm = AutoModelForTokenClassification.from_config(
        tiny_config(request.param, num_labels=1, classifier_dropout=0.0), attn_implementation="sdpa"
    ).eval()
    return lm, rm


def test_layout_and_index_maps():
    prompts, responses, has_eos = (
        [[5, 6], [7], [8, 9, 10]],
        [[11, 12, 13], [14], [15, 16]],
        [True, False, True],
    )
    packed = pack_responses(prompts, responses, has_eos, PAD, max_tokens=7)
    # lengths 5, 2, 5 -> FFD: [0] then [2] (no room in row 0), then [1] fits row 0
    assert packed.input_ids.tolist() == [[5, 6, 11, 12, 13, 7, 14], [8, 9, 10, 15, 16, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 4, 0, 0]]
    assert packed.sequence_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1], [2, 2, 2, 2, 2, -1, -1]]
    assert packed.row.tolist() == [0, 0, 1] and packed.response_start.tolist() == [2, 6, 3]
    assert packed.response_ids.tolist() == [[11, 12, 13], [14, 0, 0], [15, 16, 0]]
    assert packed.padding_tokens == 2
    mask = packed.block_mask()[1, 0] == 0  # row 1: sequence 2 causal, padding attends itself only
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[:5, :5] = torch.ones(5, 5, dtype=torch.bool).tril()
    expected[5, 5] = expected[6, 6] = True
    assert torch.equal(mask, expected)


def test_one_row_layout_and_varlen_inputs():
    """Flash attention's layout: every sequence in one row, in input order, no padding; the
    sequence boundaries go to the forward as `cu_seq_lens` (int32) and `max_length` (int)."""
    prompts, responses, has_eos = [[5, 6], [7], [8, 9, 10]], [[11, 12, 13], [14], [15, 16]], [True] * 3
    packed = pack_responses(prompts, responses, has_eos, PAD, one_row=True)
    assert packed.input_ids.tolist() == [[5, 6, 11, 12, 13, 7, 14, 8, 9, 10, 15, 16]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4]]
    assert packed.row.tolist() == [0, 0, 0] and packed.response_start.tolist() == [2, 6, 10]
    inputs = packed.model_inputs("varlen")
    assert set(inputs) == {
        "input_ids",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }
    assert inputs["cu_seq_lens_q"].tolist() == [0, 5, 7, 12] and inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]
    assert inputs["max_length_q"] == inputs["max_length_k"] == 5 and type(inputs["max_length_q"]) is int


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_responses([[]], [[4]], [True], PAD, 8)
    with pytest.raises(ValueError, match="as many prompts"):
        pack_responses([[4]], [[4], [5]], [True], PAD, 8)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_responses([[4]], [[4]], [True], PAD, 0)
    packed = pack_responses([[4]], [[4]], [True], PAD, 8)
    with pytest.raises(ValueError, match="mode"):
        packed.model_inputs("position_ids")
    two_rows = pack_responses([[4], [5]], [[4], [5]], [True, True], PAD, max_tokens=2)
    with pytest.raises(ValueError, match="one row without padding .*got 2 rows"):
        two_rows.model_inputs("varlen")
    with pytest.raises(ValueError, match="not both"):
        pack_responses([[4]], [[4]], [True], PAD, 8, one_row=True)
    with pytest.raises(ValueError, match="expected"):
        packed.gather(torch.zeros(3, 3))


def test_first_fit_decreasing_respects_capacity():
    lengths = [random.Random(1).randint(1, 30) for _ in range(50)] + [45]
    bins = first_fit_decreasing(lengths, 40)
    assert sorted(i for b in bins for i in b) == list(range(51))
    assert all(sum(lengths[i] for i in b) <= 40 or len(b) == 1 for b in bins)


@pytest.mark.parametrize("mode", MODES)
def test_rm_values_entropy_logprobs_equal_padded(models, mode):
    lm, rm = models
    prompts, responses, has_eos = _sequences(7, seed=3)
    padded = collate_responses(prompts, responses, has_eos, PAD)
    if mode == "varlen":  # flash attention's layout: everything in one row, no padding
        packed = pack_response_batch(padded, PAD, one_row=True)
        assert packed.input_ids.shape[0] == 1 and packed.padding_tokens == 0
    else:
        packed = pack_response_batch(padded, PAD, max_tokens=24)
        assert 1 < packed.input_ids.shape[0] < 7  # several sequences share rows
    mask = padded.response_mask
    with torch.no_grad():
        want_values = reward_values(rm, padded.input_ids, padded.attention_mask, padded.position_ids)
        want_values = want_values[:, padded.prompt_len :] * mask
        want_logprobs, want_entropy = logprobs_and_entropy(
            lm, padded.input_ids, padded.attention_mask, padded.position_ids, padded.prompt_len
        )
        got_values = packed_reward_values(rm, packed, mode)
        got_logprobs, got_entropy = packed_logprobs_and_entropy(lm, packed, mode)
    assert torch.equal(packed.response_mask, mask)
    torch.testing.assert_close(got_values, want_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logprobs, want_logprobs * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_entropy, want_entropy * mask, rtol=1e-5, atol=1e-5)


def test_critic_values_and_segmenter_entropy_equal_padded(models):
    """V_t from the column before token t, entropy from token t's column: as on the padded batch."""
    lm, rm = models
    prompts, responses, has_eos = _sequences(7, seed=4)
    padded = collate_responses(prompts, responses, has_eos, PAD)
    packed = pack_response_batch(padded, PAD, max_tokens=24)
    mask = padded.response_mask
    with torch.no_grad():
        want_values = critic_values(rm, padded) * mask
        _, want_entropy = logprobs_and_entropy(
            lm, padded.input_ids, padded.attention_mask, padded.position_ids, padded.prompt_len
        )
        got_values = packed_critic_values(rm, packed)
    torch.testing.assert_close(got_values, want_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_entropy(lm, packed), want_entropy * mask, rtol=1e-5, atol=1e-5)


def test_bradley_terry_loss_and_grads_equal_padded(models):
    lm, rm = models
    prompts, chosen, _ = _sequences(4, seed=5)
    _, rejected, _ = _sequences(4, seed=6)
    pairs = [
        EncodedPair(p, c, True, r, i % 2 == 0, margin=0.5 * i)
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True))
    ]

    def loss_and_grads(score_rows):
        rm.zero_grad()
        rm_values, entropy, response_mask, has_eos, margin = score_rows()
        scores = sequence_scores(
            rm_values, entropy, response_mask, granularity="segment", threshold=2.0, has_eos=has_eos
        )
        loss = bradley_terry_loss(scores[:4], scores[4:], margin)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}

    def padded_rows():
        batch = collate_preferences(pairs, PAD)
        _, entropy = logprobs_and_entropy(
            lm, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len
        )
        values = reward_values(rm, batch.input_ids, batch.attention_mask, batch.position_ids)
        return (
            values[:, batch.prompt_len :],
            entropy.detach(),
            batch.response_mask,
            batch.has_eos,
            batch.margin,
        )

    def packed_rows():
        batch = pack_preferences(pairs, PAD, max_tokens=32)
        _, entropy = packed_logprobs_and_entropy(lm, batch)
        return (
            packed_reward_values(rm, batch),
            entropy.detach(),
            batch.response_mask,
            batch.has_eos,
            batch.margin,
        )

    want_loss, want_grads = loss_and_grads(padded_rows)
    got_loss, got_grads = loss_and_grads(packed_rows)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# Token lengths estimated from the shared preference rows (../shared/data/formats: chat-templated
# prompt ≈ chars/4 + 5, response ≈ chars/4 + 2): log-normal, ln-mean/std 2.80/0.33 (prompts) and
# 2.11/0.72 (responses). Tests never read ../shared, so the fit is recorded here.
PROMPT_LOGNORMAL = (2.80, 0.33)
RESPONSE_LOGNORMAL = (2.11, 0.72)


def preference_like_lengths(n: int, seed: int, scale: float = 1.0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    prompts = [max(1, round(scale * math.exp(rng.gauss(*PROMPT_LOGNORMAL)))) for _ in range(n)]
    responses = [max(1, round(scale * math.exp(rng.gauss(*RESPONSE_LOGNORMAL)))) for _ in range(n)]
    return prompts, responses


def test_packing_halves_padding_on_preference_like_lengths():
    total_padded, total_packed = 0, 0
    for step in range(20):  # 20 micro-batches of 8 pairs = 16 sequences
        p_len, r_len = preference_like_lengths(16, seed=step)
        total_padded += padded_tokens(p_len, r_len)
        packed = pack_responses(
            [[5] * n for n in p_len],
            [[6] * n for n in r_len],
            [True] * 16,
            PAD,
            max_tokens=max(p_len) + max(r_len),
        )
        total_packed += packed.padding_tokens
    assert total_padded >= 2 * total_packed, (total_padded, total_packed)
