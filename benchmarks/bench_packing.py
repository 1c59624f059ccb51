"""Reward-model forward and training step, packed vs padded, on lengths like the shared preference rows.

Each micro-batch is 8 pairs (16 sequences) with lengths drawn from the log-normal fit in
`tests/test_packing.py` (the shared rows' statistics: prompts ~16 tokens, responses ~8 at the
median; scaled by SEGPPO_BENCH_SCALE, default 4, towards real preference data: ~64 and ~33, long
right tail). Variants:
  padded   `collate_responses` + `reward_values` (left-padded prompts, right-padded responses);
  packed   rows of at most the padded width (what `--packing` does under the block mask)
           + `packed_reward_values` with the 4D block mask (the CPU path);
  packed-varlen  the whole micro-batch in one row with the "varlen" inputs (what `--packing` does
           under flash attention; on sdpa transformers builds the mask from position_ids, so this
           stands in for the flash path without its cost per sequence);
  packed-max_len  rows of up to MAX_LEN tokens with the block mask, to show why the mask path
           keeps rows at the padded width.
`test_rm_train_step` is what `rm train` does per micro-batch: `score_pairs` (padded, or packed as
with `--packing`), the Bradley-Terry loss, backward and an AdamW step.
extra_info has real tokens, padding tokens and real tokens/s per micro-batch set.

    python -m pytest benchmarks/bench_packing.py -q --benchmark-min-rounds=3
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForTokenClassification

from segppo.data.chat import EncodedPair
from segppo.data.collate import collate_responses
from segppo.data.packing import (
    pack_preferences,
    pack_responses,
    packed_reward_values,
    packed_scores,
    padded_tokens,
)
from segppo.models.reward_model import reward_values
from segppo.rm.loss import bradley_terry_loss
from segppo.rm.trainer import score_pairs
from segppo.segments import Segmentation
from tests.test_packing import preference_like_lengths
from tests.tiny import tiny_config

SCALE = float(os.environ.get("SEGPPO_BENCH_SCALE", 4))
STEPS = 8
SEQUENCES = 16
MAX_LEN = int(os.environ.get("SEGPPO_BENCH_MAX_LEN", 2048))  # rm train's default --max-len


@pytest.fixture(scope="module")
def reward_model():
    torch.manual_seed(0)
    config = tiny_config(
        "llama", num_labels=1, classifier_dropout=0.0, hidden_size=64, max_position_embeddings=2048
    )
    return AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def micro_batches():
    batches = []
    for step in range(STEPS):
        p_len, r_len = preference_like_lengths(SEQUENCES, seed=step, scale=SCALE)
        prompts = [[5 + (i % 300)] * n for i, n in enumerate(p_len)]
        responses = [[7 + (i % 300)] * n for i, n in enumerate(r_len)]
        batches.append((p_len, r_len, prompts, responses))
    return batches


@pytest.mark.parametrize("layout", ["padded", "packed", "packed-varlen", "packed-max_len"])
def test_rm_forward(benchmark, reward_model, micro_batches, layout):
    benchmark.group = f"rm forward packed vs padded, scale {SCALE:g}"
    real = sum(sum(p) + sum(r) for p, r, _, _ in micro_batches)
    if layout == "padded":
        inputs = [collate_responses(pr, rs, [True] * SEQUENCES, 0) for _, _, pr, rs in micro_batches]
        padding = sum(padded_tokens(p, r) for p, r, _, _ in micro_batches)

        def run():
            with torch.no_grad():
                for b in inputs:
                    reward_values(reward_model, b.input_ids, b.attention_mask, b.position_ids)

    else:
        mode = "varlen" if layout == "packed-varlen" else "mask"
        max_tokens = MAX_LEN if layout == "packed-max_len" else None
        inputs = [
            pack_responses(pr, rs, [True] * SEQUENCES, 0, max_tokens, one_row=mode == "varlen")
            for _, _, pr, rs in micro_batches
        ]
        padding = sum(b.padding_tokens for b in inputs)

        def run():
            with torch.no_grad():
                for b in inputs:
                    packed_reward_values(reward_model, b, mode)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        real_tokens=real,
        padding_tokens=padding,
        tokens_per_s=real / benchmark.stats.stats.median,
    )
    print(
        f"\n{layout}: {real} real tokens, {padding} padding, "
        f"{benchmark.extra_info['tokens_per_s']:.0f} tokens/s"
    )


@pytest.fixture(scope="module")
def pair_batches(micro_batches):
    """The same 16 sequences per micro-batch as 8 pairs: prompt i with responses i and i + 8."""
    half = SEQUENCES // 2
    return [
        [EncodedPair(prompts[i], responses[i], True, responses[i + half], True) for i in range(half)]
        for _, _, prompts, responses in micro_batches
    ]


@pytest.mark.parametrize("layout", ["padded", "packed", "packed-max_len"])
def test_rm_train_step(benchmark, pair_batches, layout):
    benchmark.group = f"rm train step packed vs padded, scale {SCALE:g}"
    torch.manual_seed(0)
    config = tiny_config(
        "llama", num_labels=1, classifier_dropout=0.0, hidden_size=64, max_position_embeddings=2048
    )
    model = AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    segmentation = Segmentation.resolve("token", 0.0)  # no segmenter: the RM's own cost
    real = sum(
        len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for b in pair_batches for p in b
    )
    row = MAX_LEN if layout == "packed-max_len" else None  # None: the padded width (sdpa's rows)
    if layout == "padded":
        padding = sum(
            padded_tokens(
                [len(p.prompt_ids) for p in b] * 2,
                [len(p.chosen_ids) for p in b] + [len(p.rejected_ids) for p in b],
            )
            for b in pair_batches
        )
    else:
        padding = sum(pack_preferences(b, 0, row).padding_tokens for b in pair_batches)

    def run():
        for pairs in pair_batches:
            if layout == "packed-max_len":
                scores = packed_scores(model, None, pack_preferences(pairs, 0, MAX_LEN), segmentation)
                chosen, rejected = scores.chunk(2)
            else:  # exactly what rm train runs, with or without --packing
                cpu = torch.device("cpu")
                chosen, rejected, _ = score_pairs(
                    model, None, pairs, segmentation, 0, cpu, packing=layout == "packed"
                )
            bradley_terry_loss(chosen, rejected).backward()
            optimizer.step()
            optimizer.zero_grad()

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        real_tokens=real,
        padding_tokens=padding,
        tokens_per_s=real / benchmark.stats.stats.median,
    )
    print(
        f"\ntrain step {layout}: {real} real tokens, {padding} padding, "
        f"{benchmark.extra_info['tokens_per_s']:.0f} tokens/s"
    )
