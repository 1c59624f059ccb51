"""Collecting the normalizer's `(p = k/K, r_k)` points (`segppo fit-normalizer`) on CPU.

The same tiny random Llama reward model, segmenter and preference pairs (64 pairs, responses of
~100 tokens, entropy spikes on ~15% of tokens) are scored two ways, 8 pairs per forward both:

  segppo  `collect_points`: pairs of similar length batched together, chosen and rejected rows in
          one forward each of the RM and the segmenter (entropy on response columns only, one pass
          over the vocabulary), then `segment_points` for the whole batch at once;
  paper   the paper's collection script (reward-bench `calc_train_reward_mean_std.py` with its
          `DenserSegRMFPipeline`): chosen and rejected responses in separate calls, the segmenter's
          full-sequence log-softmax for entropy, then per response a per-token `.item()` loop over
          the entropy to find the segment ends and a Python list of `(k/K, r.item())`.

Two groups of timings:

  collect  everything above, forwards included. The two forwards are the same model work both
           ways and dominate on CPU even for the tiny model (~25 ms per 16 rows of ~120 tokens on
           one thread), so this ratio is small and mostly says the forwards cost what they cost;
  points   the part that differs: from already-scored tensors (RM values and entropy of all 64
           pairs) to the points, `segment_points` against the per-token loop. The issue's target
           (at least 10x the paper's per-token-loop collection) is this ratio.

Both ways give the same points (checked once, outside the timing).

    python -m pytest benchmarks/bench_normalizer.py -q --benchmark-min-rounds=3

SEGPPO_BENCH_PAIRS / SEGPPO_BENCH_WORDS (words per response, ~2.5 tokens each) change the sizes;
SEGPPO_BENCH_THREADS (default 1) the torch threads, as in bench_rewards.py. The medians and the
paper/segppo ratios are printed at the end of the module.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import save_tiny_lm, write_preferences  # noqa: E402

from segppo.data import collate_preferences, collate_responses, encode_preferences, load_rows  # noqa: E402
from segppo.fit_normalizer import collect_points  # noqa: E402
from segppo.models import (  # noqa: E402
    SegppoMetadata,
    create_reward_model,
    load_policy,
    load_tokenizer,
    save_reward_model,
)
from segppo.models.reward_model import reward_values  # noqa: E402
from segppo.normalizer import segment_points  # noqa: E402
from segppo.rm.scoring import load_scorer  # noqa: E402

THRESHOLD = 2.0
BATCH_PAIRS = 8  # the paper's script (batch_size=8) and segppo's --batch-size default
SEGMENTER_LOGIT_SCALE = 50.0  # spreads the random model's entropies so that τ = 2 ends ~15% of tokens


def _size(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    """A tiny segment RM (random head) with its segmenter, and the encoded pairs."""
    root = tmp_path_factory.mktemp("bench_normalizer")
    lm = save_tiny_lm(root / "lm")
    segmenter = load_policy(lm)
    with torch.no_grad():
        segmenter.lm_head.weight.mul_(SEGMENTER_LOGIT_SCALE)
    segmenter.save_pretrained(root / "segmenter")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(lm) / name, root / "segmenter")
    torch.manual_seed(0)
    model = create_reward_model(lm)
    metadata = SegppoMetadata(
        kind="reward_model", granularity="segment", threshold=THRESHOLD, segmenter=str(root / "segmenter")
    )
    save_reward_model(model, load_tokenizer(lm), root / "rm", metadata)
    scorer = load_scorer(str(root / "rm"), device="cpu")

    data = write_preferences(
        root / "prefs.jsonl", n=_size("SEGPPO_BENCH_PAIRS", 64), seed=1, words=_size("SEGPPO_BENCH_WORDS", 40)
    )
    pairs, _ = encode_preferences(
        load_rows(data), scorer.tokenizer, max_len=256, max_prompt_len=64, chat_template=scorer.chat.template
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(_size("SEGPPO_BENCH_THREADS", 1))
    yield scorer, pairs
    torch.set_num_threads(threads)


def segppo_way(scorer, pairs) -> tuple[np.ndarray, np.ndarray]:
    return collect_points(scorer, pairs, batch_size=BATCH_PAIRS).arrays()


def _paper_points(mask, values, prompt_len, lengths, has_eos, points: list) -> None:
    """The paper's per-response, per-token loop: `.item()` on every entropy flag, lists of ends."""
    for i in range(len(lengths)):
        length = int(lengths[i].item())
        last = prompt_len + length - 1 - int(has_eos[i].item())  # the trailing EOS is in no segment
        segment_end_positions = []
        for j in range(prompt_len, last):
            if mask[i, j].item() == 1:
                segment_end_positions.append(j)
        segment_end_positions.append(last if last >= prompt_len else prompt_len + length - 1)
        num_segments = len(segment_end_positions)
        for k, end in enumerate(segment_end_positions):
            points.append(((k + 1) / num_segments, values[i, end].item()))


@torch.no_grad()
def paper_way(scorer, pairs) -> tuple[np.ndarray, np.ndarray]:
    points: list[tuple[float, float]] = []
    pad = scorer.tokenizer.pad_token_id
    for start in range(0, len(pairs), BATCH_PAIRS):
        chunk = pairs[start : start + BATCH_PAIRS]
        prompts = [pair.prompt_ids for pair in chunk]
        for responses, has_eos in (
            ([pair.chosen_ids for pair in chunk], [pair.chosen_has_eos for pair in chunk]),
            ([pair.rejected_ids for pair in chunk], [pair.rejected_has_eos for pair in chunk]),
        ):
            batch = collate_responses(prompts, responses, has_eos, pad)
            logits = scorer.segmenter(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
            log_probs = F.log_softmax(logits.float(), dim=-1)
            entropy = -torch.sum(torch.exp(log_probs) * log_probs, dim=-1)
            mask = (entropy > THRESHOLD).float()
            values = reward_values(scorer.model, batch.input_ids, batch.attention_mask, batch.position_ids)
            lengths = batch.response_mask.sum(-1)
            _paper_points(mask, values, batch.prompt_len, lengths, batch.has_eos, points)
    p, r = zip(*points, strict=True)
    return np.array(p), np.array(r)


@pytest.fixture(scope="module")
def scored(bench_data):
    """All pairs scored once, for timing the point extraction alone."""
    scorer, pairs = bench_data
    batch = collate_preferences(pairs, scorer.tokenizer.pad_token_id)
    out = scorer.score(batch)
    # The paper's loop indexes full-sequence columns: put the response-aligned tensors there.
    full = lambda x: torch.cat([x.new_zeros(x.shape[0], batch.prompt_len), x], dim=1)  # noqa: E731
    return batch, out, full(out.entropy), full(out.rm_values)


def segppo_points(batch, out, *_):
    return segment_points(
        out.rm_values, out.entropy, batch.response_mask,
        granularity="segment", threshold=THRESHOLD, has_eos=batch.has_eos,
    )  # fmt: skip


def paper_points(batch, out, entropy, values):
    points: list[tuple[float, float]] = []
    mask = (entropy > THRESHOLD).float()
    _paper_points(mask, values, batch.prompt_len, batch.response_mask.sum(-1), batch.has_eos, points)
    return points


def _sorted(p, r):
    p, r = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
    order = np.lexsort((r, p))
    return p[order], r[order]


@pytest.fixture(scope="module")
def medians(request):
    """Collects each benchmark's median (seconds) and prints them, with the ratios, at the end."""
    found: dict[str, float] = {}
    yield found
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not found:
        return
    lines = [f"median {name:<24} {seconds * 1e3:10.2f} ms" for name, seconds in found.items()]
    for what in ("collect", "points"):
        if f"{what}/paper" in found and f"{what}/segppo" in found:
            ratio = found[f"{what}/paper"] / found[f"{what}/segppo"]
            target = " (target >= 10x)" if what == "points" else " (forwards included)"
            lines.append(f"paper / segppo, {what}: {ratio:.1f}x{target}")
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


def _record(benchmark, medians: dict, name: str, **info) -> None:
    benchmark.extra_info.update(info)
    if benchmark.stats is not None:  # None under --benchmark-disable
        medians[name] = benchmark.stats.stats.median


def test_both_ways_give_the_same_points(bench_data, scored):
    scorer, pairs = bench_data
    p, r = _sorted(*segppo_way(scorer, pairs))
    p_paper, r_paper = _sorted(*paper_way(scorer, pairs))
    np.testing.assert_array_equal(p, p_paper)
    np.testing.assert_allclose(r, r_paper, atol=1e-5)
    assert len(p) > 4 * len(pairs)  # several segments per response
    q, s = _sorted(*segppo_points(*scored))
    q_paper, s_paper = _sorted(*zip(*paper_points(*scored), strict=True))
    np.testing.assert_array_equal(q, q_paper)
    np.testing.assert_allclose(s, s_paper, atol=1e-6)


@pytest.mark.benchmark(group="normalizer points: score + collect")
@pytest.mark.parametrize("way", ["segppo", "paper"])
def test_collect(benchmark, medians, bench_data, way):
    scorer, pairs = bench_data
    fn = segppo_way if way == "segppo" else paper_way
    p, _ = benchmark(fn, scorer, pairs)
    tokens = sum(len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs)
    _record(benchmark, medians, f"collect/{way}", pairs=len(pairs), response_tokens=tokens, points=len(p))


@pytest.mark.benchmark(group="normalizer points: collect only")
@pytest.mark.parametrize("way", ["segppo", "paper"])
def test_points_only(benchmark, medians, scored, way):
    benchmark(segppo_points if way == "segppo" else paper_points, *scored)
    _record(benchmark, medians, f"points/{way}", rows=scored[0].response_mask.shape[0])
