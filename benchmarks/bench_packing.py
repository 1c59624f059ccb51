"""Reward-model forward, packed vs padded, on a length distribution like the shared preference rows.

Each micro-batch is 8 pairs (16 sequences) with lengths drawn from the log-normal fit in
`tests/test_packing.py` (scaled by SEGPPO_BENCH_SCALE, default 4, towards real preference data:
prompts ~64 tokens, responses ~33 at the median, long right tail). Variants:
  padded   `collate_responses` + `reward_values` (left-padded prompts, right-padded responses);
  packed   `pack_responses` (rows of at most the padded width) + `packed_reward_values` with the
           4D block mask (the CPU path);
  packed-position_ids  the same rows with position_ids only (transformers builds the mask; the
           flash-attention varlen path on GPU).
extra_info has real tokens, padding tokens and real tokens/s per micro-batch set.

    python -m pytest benchmarks/bench_packing.py -q --benchmark-min-rounds=3
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForTokenClassification

from segppo.data.collate import collate_responses
from segppo.data.packing import pack_responses, packed_reward_values, padded_tokens
from segppo.models.reward_model import reward_values
from tests.test_packing import preference_like_lengths
from tests.tiny import tiny_config

SCALE = float(os.environ.get("SEGPPO_BENCH_SCALE", 4))
STEPS = 8
SEQUENCES = 16


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


@pytest.mark.parametrize("layout", ["padded", "packed", "packed-position_ids"])
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
        mode = "position_ids" if layout.endswith("position_ids") else "mask"
        inputs = [
            pack_responses(pr, rs, [True] * SEQUENCES, 0, max_tokens=max(p) + max(r))
            for p, r, pr, rs in micro_batches
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
