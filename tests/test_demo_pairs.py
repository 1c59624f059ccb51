"""The demo's second gold task (`--task pairs`) and the comparison's statistics (no training here)."""

import math
import random

import pytest

from segppo.config import DemoConfig
from segppo.demo import Demonstrator, SFTSettings, gold_reward, parse_prompt, phrase_rewards, sample_prompts
from segppo.demo.credit import pearson
from segppo.demo.pipeline import NEAR_CHANCE_ACCURACY, paired_differences, rm_warnings
from segppo.demo.task import TASKS, PromptError, sft_corpus

PAIRS = "list : Red Fox ; Blue Owl"


@pytest.mark.parametrize(
    "response, gold",
    [
        ("the red fox . the blue owl . that is all .", 2.25),
        ("the blue fox . the red owl .", -2.0),  # swaps: every word is in the prompt, both items wrong
        ("the red fox . the red fox .", 0.5),  # repeat
        ("the green fox .", -1.0),  # a color not in the prompt
        ("animal fox . the fox is fast . it runs .", -0.5),  # other templates are unrequested; filler 0
        ("the red fox", -0.5),  # unfinished
    ],
)
def test_pairs_gold_reward_pinned(response, gold):
    assert gold_reward(PAIRS, response) == pytest.approx(gold)


def test_a_pair_is_right_or_wrong_only_as_a_whole():
    # The same words, in the same positions, earn +1 or -1 depending on the word they are paired with.
    right = [p.reward for p in phrase_rewards(PAIRS, "the red fox . the blue owl .")]
    swapped = [p.reward for p in phrase_rewards(PAIRS, "the blue fox . the red owl .")]
    assert right == [1.0, 1.0] and swapped == [-1.0, -1.0]
    assert [p.reason for p in phrase_rewards(PAIRS, "the blue fox .")] == ["swapped pair"]


def test_the_animals_task_is_unchanged():
    # its prompt stream is the one it had before there were two tasks, and a pair phrase is malformed there
    assert sample_prompts(20, 3) == sample_prompts(20, 3, task="animals")
    assert gold_reward("describe : Red Fox ; mood : Calm", "the red fox .") == -0.5
    assert all(not p.startswith("list :") for p in sample_prompts(200, 0))


def test_pairs_prompts_parse_and_render():
    prompts = sample_prompts(200, 0, task="pairs")
    assert all(p.startswith("list : ") for p in prompts)
    for p in prompts:
        task = parse_prompt(p)
        assert task.kind == "pairs" and 2 <= len(task.pairs) <= 3 and task.text() == p
    assert sample_prompts(50, 0, "heldout", task="pairs") != sample_prompts(50, 0, "train", task="pairs")
    with pytest.raises(PromptError, match="distinct"):
        parse_prompt("list : Red Fox ; Red Owl")
    with pytest.raises(PromptError, match="pairs prompt"):
        parse_prompt("list : Red Fox")
    with pytest.raises(ValueError, match="unknown demo task"):
        sample_prompts(1, 0, task="colors")


def test_pairs_demonstrator_errs_mostly_by_swapping():
    corpus = sft_corpus(400, 0, task="pairs")
    reasons = [
        p.reason
        for prompt, r in zip(corpus.prompts, corpus.responses, strict=True)
        for p in phrase_rewards(prompt, r)
    ]
    wrong = [r for r in reasons if r in ("swapped pair", "not a pair of the prompt")]
    assert reasons.count("correct") > 0.3 * len(reasons)
    assert reasons.count("swapped pair") > 0.6 * len(wrong)
    oracle = Demonstrator.oracle()
    rng = random.Random(0)
    for prompt in corpus.prompts[:50]:
        assert gold_reward(prompt, oracle(prompt, rng)) == len(parse_prompt(prompt).pairs) + 0.25


def test_the_sft_policy_cache_follows_the_task():
    assert SFTSettings(task="pairs").key() != SFTSettings().key()


def test_demo_config_task_and_seeds():
    assert set(TASKS) == {"animals", "pairs"}
    assert DemoConfig(task="pairs").task == "pairs"
    with pytest.raises(ValueError, match="--task"):
        DemoConfig(task="colors")
    assert DemoConfig(compare=["bandit"]).seeds is None  # resolved to 3 seeds by run_demo
    with pytest.raises(ValueError, match="--seeds"):
        DemoConfig(seeds=0)


def test_a_granularity_named_twice_in_compare_is_refused():
    """`--compare segment,segment` would train the same setting twice into one folder (the second
    rm train stopping on the first's run, minutes in): a mistaken flag, refused before any training."""
    assert DemoConfig(compare=["bandit,segment"]).compare == ["bandit", "segment"]
    with pytest.raises(ValueError, match="--compare names segment twice"):
        DemoConfig(compare=["segment,token", "segment"])


def test_a_negative_demo_seed_is_refused_before_any_training():
    """The demo's runs seed numpy, torch and rm train with --seed and the ones after it; a negative
    one stopped rm train ('Seed must be between 0 and 2**32 - 1') after the task data and SFT."""
    assert DemoConfig(seed=0).seed == 0
    with pytest.raises(ValueError, match=r"--seed must be in \[0, 2\*\*32 - 1\], got -1"):
        DemoConfig(seed=-1)


def test_the_pairs_budget_is_refused_on_another_task():
    """`--budget pairs` trains its RMs' backbone on the pairs task's lookup (10 minutes): on `animals`
    that is a mistaken flag, not a run to start."""
    assert DemoConfig(budget="pairs", task="pairs").budget == "pairs"
    with pytest.raises(ValueError, match="--budget pairs.*--task pairs"):
        DemoConfig(budget="pairs")


def _row(granularity, seed, gain, accuracy=0.8, last_epoch_gain=0.0):
    return {
        "granularity": granularity,
        "seed": seed,
        "sft_gold": 0.1 * seed,
        "ppo_gold": 0.1 * seed + gain,
        "rm_accuracy": accuracy,
        "rm_last_epoch_gain": last_epoch_gain,
    }


def test_paired_differences_by_hand():
    rows = [
        _row("bandit", 0, 0.5), _row("segment", 0, 0.9),
        _row("bandit", 1, 0.4), _row("segment", 1, 0.6),
        _row("bandit", 2, 0.6), _row("segment", 2, 1.2),
        _row("token", 0, 1.0),  # one seed only: paired on seed 0
    ]  # fmt: skip
    diffs = {(d["a"], d["b"]): d for d in paired_differences(rows)}
    d = diffs["bandit", "segment"]
    assert d["seeds"] == [0, 1, 2] and d["per_seed"] == pytest.approx([-0.4, -0.2, -0.6])
    assert d["mean"] == pytest.approx(-0.4)
    assert d["se"] == pytest.approx(0.2 / math.sqrt(3))  # stdev of (-0.4, -0.2, -0.6) is 0.2
    assert diffs["segment", "token"]["seeds"] == [0] and math.isnan(diffs["segment", "token"]["se"])


def test_rm_warnings_near_chance_and_still_climbing():
    rows = [
        _row("bandit", 0, 0.1, accuracy=NEAR_CHANCE_ACCURACY - 0.05),
        _row("segment", 0, 0.1, last_epoch_gain=0.05),
        _row("token", 0, 0.1, last_epoch_gain=float("nan")),
    ]
    warnings = rm_warnings(rows)
    assert len(warnings) == 3
    assert "bandit" in warnings[0] and "near chance" in warnings[0]
    assert "segment" in warnings[1] and "levelled off" in warnings[1]
    assert "not matched" in warnings[2]  # the near-chance RM is 0.25 below the others


def test_rm_warnings_say_when_the_granularities_rms_are_not_matched():
    # issue 24: RM accuracies matched within 0.05 (mean over seeds), or reported as not matched
    matched = [_row("bandit", 0, 0.1, accuracy=0.72), _row("token", 0, 0.1, accuracy=0.76)]
    assert rm_warnings(matched) == []
    rows = [
        _row("bandit", 0, 0.1, accuracy=0.70), _row("bandit", 1, 0.1, accuracy=0.74),
        _row("token", 0, 0.1, accuracy=0.80), _row("segment", 0, 0.1, accuracy=0.75),
    ]  # fmt: skip
    (warning,) = rm_warnings(rows)
    assert "not matched" in warning and "bandit 0.720" in warning and "token 0.800" in warning
    assert "0.080" in warning


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([1], [1]))


def test_a_new_sft_setting_left_unset_keeps_the_cache_key():
    # The key before `pretrain_p_shuffle` existed: every field but it, so cached policies stay valid.
    import dataclasses
    import hashlib
    import json

    from segppo.demo.task import TASK_VERSION, vocabulary
    from segppo.demo.tokenizer import CHAT_TEMPLATE

    settings = SFTSettings(task="pairs")
    sample = sft_corpus(16, 0, task="pairs")
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k != "pretrain_p_shuffle"}
    text = json.dumps(
        {
            "task_version": TASK_VERSION,
            "vocabulary": vocabulary(),
            "template": CHAT_TEMPLATE,
            "sample": [sample.prompts, sample.responses],
            **fields,
        },
        sort_keys=True,
    )
    assert settings.key() == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert SFTSettings(task="pairs", pretrain_p_shuffle=1.0).key() != settings.key()


def test_demonstrator_p_shuffle_sets_how_often_items_leave_the_prompts_order():
    def out_of_order(p_shuffle):
        rng = random.Random(0)
        demonstrator = Demonstrator(p_correct=1.0, p_omit=0, p_repeat=0, p_malformed=0, p_shuffle=p_shuffle)
        count = 0
        for prompt in sample_prompts(300, 0, task="pairs"):
            animals = [a for _, a in parse_prompt(prompt).pairs]
            listed = [p.animal for p in phrase_rewards(prompt, demonstrator(prompt, rng)) if p.kind == "pair"]
            count += listed != [a for a in animals if a in listed]
        return count / 300

    assert out_of_order(0.0) == 0.0
    assert 0.1 < out_of_order(0.3) < 0.3  # a shuffle can keep the order (1/2 or 1/6 of the time)
    assert out_of_order(1.0) > 0.5
