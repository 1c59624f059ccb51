"""`segppo eval` end to end on CPU: 1,000 responses from a tiny policy, generated and RM-scored.

The issue's target: `segppo eval` scores 1,000 responses from a tiny policy on CPU in under a
minute. Timed here is one whole `evaluate()` call, as the command runs it: loading the policy, the
reward model and its segmenter, 500 prompts × 2 samples generated in batches of 64 with per-row
seeded sampling (up to 64 new tokens each; the random policy rarely stops early, so most responses
are full length), scoring (segmenter entropy, RM values, sequence scores, PPO-normalized segment
rewards), statistics, the benchmark exports and `results.json`.

The models are the tests' tiny random Llama (2 layers, hidden 32, vocabulary 384) with a
segment-level RM head; the segmenter's logits are scaled so that τ = 2 ends a realistic share of
tokens (as in bench_normalizer.py). One round: the figure is a wall-clock time, not a kernel
micro-benchmark.

    python -m pytest benchmarks/bench_eval.py -q

SEGPPO_BENCH_PROMPTS (500), SEGPPO_BENCH_SAMPLES (2), SEGPPO_BENCH_NEW_TOKENS (64) and
SEGPPO_BENCH_THREADS (torch threads, default 1; see bench_rewards.py) change the set-up. The time
and its split into generation and scoring are printed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import save_tiny_lm  # noqa: E402

from segppo.config import EvalConfig  # noqa: E402
from segppo.eval import evaluate  # noqa: E402
from segppo.models import (  # noqa: E402
    SegppoMetadata,
    create_reward_model,
    load_policy,
    load_tokenizer,
    save_reward_model,
)

THRESHOLD = 2.0
SEGMENTER_LOGIT_SCALE = 50.0
WORDS = ["the", "fox", "dog", "legs", "water", "cold", "red", "trees", "wind", "capital", "city"]


def _size(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_eval")
    lm = save_tiny_lm(root / "policy")
    segmenter = load_policy(lm)
    with torch.no_grad():
        segmenter.lm_head.weight.mul_(SEGMENTER_LOGIT_SCALE)
    segmenter.save_pretrained(root / "segmenter")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(lm) / name, root / "segmenter")
    torch.manual_seed(0)
    metadata = SegppoMetadata(
        kind="reward_model",
        granularity="segment",
        threshold=THRESHOLD,
        segmenter=str(root / "segmenter"),
        normalizer={"params": [-0.35, 0.12, 0.4, 0.9], "sigma_floor": 1e-2},
    )
    save_reward_model(create_reward_model(lm), load_tokenizer(lm), root / "rm", metadata)
    n = _size("SEGPPO_BENCH_PROMPTS", 500)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Question {i}: name the {WORDS[i % len(WORDS)]} and the {WORDS[i * 7 % 11]}."}
            )
            + "\n"
            for i in range(n)
        )
    )
    cfg = EvalConfig(
        policy=[lm],
        prompts=str(prompts),
        output=str(root / "out"),
        reward_model=str(root / "rm"),
        num_samples=_size("SEGPPO_BENCH_SAMPLES", 2),
        max_new_tokens=_size("SEGPPO_BENCH_NEW_TOKENS", 64),
        max_prompt_len=128,
        batch_size=64,
        seed=0,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(_size("SEGPPO_BENCH_THREADS", 1))
    yield cfg
    torch.set_num_threads(threads)


def test_eval_1000_responses(benchmark, setup, request):
    cfg = setup
    results = benchmark.pedantic(evaluate, args=(cfg,), kwargs={"progress": False}, rounds=1, iterations=1)
    (policy,) = results.policies.values()
    responses = len(policy.generations)
    assert responses == _size("SEGPPO_BENCH_PROMPTS", 500) * cfg.num_samples
    tokens = sum(g.length for g in policy.generations)
    info = dict(
        responses=responses,
        response_tokens=tokens,
        mean_length=tokens / responses,
        segments_per_response=policy.segments,
        time_generation_s=policy.time_generation_s,
        time_scoring_s=policy.time_scoring_s,
        time_total_s=results.time_s,
        torch_threads=torch.get_num_threads(),
    )
    benchmark.extra_info.update(info)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(
                f"segppo eval: {responses} responses ({tokens} tokens, {policy.segments:.1f} segments each) "
                f"in {results.time_s:.1f} s: generation {policy.time_generation_s:.1f} s, "
                f"scoring {policy.time_scoring_s:.1f} s (target: under 60 s)"
            )
