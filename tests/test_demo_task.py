"""The demo's synthetic task: gold reward, tokenizer, prompt sets, SFT policy cache, preference data."""

import dataclasses
import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from segppo.data import ChatFormat, encode_preferences, encode_prompts, load_rows, load_splits
from segppo.demo import (
    DemoBudget,
    Demonstrator,
    SFTSettings,
    build_tokenizer,
    default_cache_dir,
    get_budget,
    gold_reward,
    gold_rewards,
    is_heldout,
    label_pairs,
    parse_prompt,
    phrase_rewards,
    policy_gold,
    prepare,
    sample_prompts,
    sft_corpus,
    sft_policy,
)
from segppo.demo import sft as sft_module
from segppo.demo.sft import encode_corpus
from segppo.demo.task import PromptError, split_phrases, vocabulary, words
from segppo.models import load_tokenizer

DESCRIBE = "describe : Big Red Fox ; mood : Calm"
FAST = "list two animals that are Fast"

# ---------------------------------------------------------------------------------------------
# Gold reward


@pytest.mark.parametrize(
    "prompt, response, gold",
    [
        # the module doc's example: +1 -1 +1 -0.25 +0.25
        (DESCRIBE, "animal fox . color blue . mood calm . place cave . that is all .", 1.0),
        (DESCRIBE, "animal fox . mood calm .", 2.0),
        (DESCRIBE, "size big . color red . animal fox . mood calm . that is all .", 4.25),
        (DESCRIBE, "animal fox . animal fox .", 0.5),  # +1, repeat -0.5
        (DESCRIBE, "animal dog . animal dog .", -2.0),  # contradictions count every time
        (DESCRIBE, "animal red . mood calm", -1.0),  # malformed (wrong kind of value), unfinished
        (DESCRIBE, "that is all . animal fox . i like it . it runs .", 1.0),  # closing not last: 0
        (DESCRIBE, "the fox is fast .", -0.25),  # a list item is unrequested here
        (DESCRIBE, "", 0.0),
        (FAST, "the cat is fast . the dog is fast . that is all .", 0.25),
        (FAST, "the dog is fast . the wolf is fast . the deer is fast .", 1.5),  # third: too many
        (FAST, "the dog is fast . the dog is fast .", 0.5),  # repeat
        (FAST, "the dog is wild . animal dog .", -0.5),  # off-task item, slot phrase
        (FAST + " ; not : Fox", "the fox is fast . the hawk is fast .", 0.0),  # excluded -1, +1
        # prompts are read case-insensitively: the gold reward is about meaning
        ("describe: big red fox; mood: calm", "Animal Fox . mood calm .", 2.0),
    ],
)
def test_gold_reward_pinned(prompt, response, gold):
    assert gold_reward(prompt, response) == pytest.approx(gold)
    assert sum(p.reward for p in phrase_rewards(prompt, response)) == pytest.approx(gold)


def test_length_term():
    # fillers earn 0; every word (punctuation counts) beyond 24 costs 0.1
    assert gold_reward(DESCRIBE, " ".join(["it runs ."] * 8)) == 0.0  # 24 words
    assert gold_reward(DESCRIBE, " ".join(["it runs ."] * 9)) == pytest.approx(-0.3)  # 27 words
    long = " ".join(["animal fox ."] + ["it runs ."] * 9)  # 30 words
    assert gold_reward(DESCRIBE, long) == pytest.approx(1 - 0.6)


def test_changing_one_phrase_changes_the_reward_by_its_contribution():
    base = "animal fox . color blue . mood calm . that is all ."
    before = phrase_rewards(DESCRIBE, base)
    assert [p.reward for p in before] == [1.0, -1.0, 1.0, 0.25]
    for new, delta in [("color red .", 2.0), ("size big .", 2.0), ("mood sad .", 0.0), ("it hides .", 1.0)]:
        response = base.replace("color blue .", new)
        after = phrase_rewards(DESCRIBE, response)
        assert [p.reward for i, p in enumerate(after) if i != 1] == [1.0, 1.0, 0.25]
        assert gold_reward(DESCRIBE, response) - gold_reward(DESCRIBE, base) == pytest.approx(delta)
    # where the phrase sits does not matter (rewards come from anywhere in the response)
    moved = "color blue . animal fox . mood calm . that is all ."
    assert gold_reward(DESCRIBE, moved) == gold_reward(DESCRIBE, base)


def test_contributions_depend_only_on_earlier_phrases():
    """Locality: a phrase's contribution is fixed by the prompt and the phrases before it (the
    closing bonus by whether it is last), so credit sits where the phrase is."""
    rng = random.Random(0)
    demonstrator = Demonstrator(p_correct=0.5, p_repeat=0.5, p_malformed=0.2)
    for prompt in sample_prompts(200, 0):
        response = demonstrator(prompt, rng)
        full = phrase_rewards(prompt, response)
        for k in range(1, len(full)):
            prefix = " ".join(" ".join(p) for p in split_phrases(response)[:k])
            head = phrase_rewards(prompt, prefix)
            same = [a.reward == b.reward for a, b in zip(head, full[:k], strict=True)]
            assert all(same[:-1]) and (same[-1] or head[-1].kind == "closing")


def test_gold_rewards_is_the_scorer_form():
    prompts, responses = [DESCRIBE, FAST], ["animal fox .", "the dog is fast ."]
    assert gold_rewards(prompts, responses) == [1.0, 1.0]


def test_prompts_parse_and_render():
    task = parse_prompt("describe: big red fox; mood: calm")  # spacing and case do not matter
    assert task.slot_values == {"animal": "fox", "size": "big", "color": "red", "mood": "calm"}
    assert task.text() == DESCRIBE
    task = parse_prompt(FAST + " ; not : Fox")
    assert (task.kind, task.count, task.trait, task.exclude) == ("list", 2, "fast", "fox")
    assert task.text() == FAST + " ; not : Fox"
    for bad in ["hello", "describe : Red", "describe : Fox ; mood : Forest", "list 2 animals that are Fast"]:
        with pytest.raises(PromptError):
            parse_prompt(bad)
    for prompt in sample_prompts(300, 1) + sample_prompts(300, 1, "heldout"):
        assert parse_prompt(prompt).text() == prompt


def test_demonstrators_order_as_expected():
    prompts = sample_prompts(400, 0, "heldout")
    means = {}
    for name, demonstrator in [
        ("sft", Demonstrator()),
        ("better", Demonstrator(p_correct=0.9)),
        ("oracle", Demonstrator.oracle()),
    ]:
        rng = random.Random(0)
        responses = [demonstrator(p, rng) for p in prompts]
        assert all(8 <= len(words(r)) <= 30 for r in responses)
        means[name] = sum(gold_rewards(prompts, responses)) / len(prompts)
    # the SFT data's demonstrator is mediocre; there is room above it
    assert means["sft"] < 0.5 and means["better"] > 1.5 and means["oracle"] > means["better"] + 1


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat format


def test_tokenizer_round_trip_and_size():
    tokenizer = build_tokenizer()
    assert len(tokenizer) < 300
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>"
    corpus = sft_corpus(200, 0)
    for text in corpus.prompts + corpus.responses:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer("animal fox.")["input_ids"]) == 3  # punctuation is its own word
    assert tokenizer("animal zebra")["input_ids"][1] == tokenizer.unk_token_id
    # prompts' capitalised values are words of their own
    assert tokenizer("Fox fox")["input_ids"][0] != tokenizer("Fox fox")["input_ids"][1]
    assert set(vocabulary()) <= set(tokenizer.get_vocab())


def test_chat_template_prefix_property_and_eos(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    chat = ChatFormat(tokenizer)
    assert chat.stop_token_ids == [tokenizer.eos_token_id]
    assert chat.end_of_turn_id == tokenizer.eos_token_id
    corpus = sft_corpus(50, 3)
    ids, prompt_lens = encode_corpus(tokenizer, corpus.prompts, corpus.responses)
    for prompt, response, full, n in zip(corpus.prompts, corpus.responses, ids, prompt_lens, strict=True):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = chat.prompt_ids(messages)
        conversation = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=True, return_dict=False
        )
        conversation = conversation["input_ids"] if isinstance(conversation, dict) else list(conversation)
        assert conversation[: len(prompt_ids)] == prompt_ids
        response_ids, has_eos = chat.response_ids(messages, response, prompt_ids)
        assert has_eos and response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in response_ids[:-1]
        # the SFT's fast encoding is exactly ChatFormat's
        assert full == prompt_ids + response_ids and n == len(prompt_ids)
        assert tokenizer.decode(response_ids, skip_special_tokens=True) == response


# ---------------------------------------------------------------------------------------------
# Prompt sets and corpus


def test_prompt_sets_are_deterministic_and_disjoint():
    train, heldout = sample_prompts(2000, 0, "train"), sample_prompts(500, 0, "heldout")
    assert train == sample_prompts(2000, 0, "train") and heldout == sample_prompts(500, 0, "heldout")
    assert train != sample_prompts(2000, 1, "train")
    assert not set(train) & set(heldout)
    assert not set(sample_prompts(2000, 1, "train")) & set(heldout)  # the split ignores the seed
    assert all(is_heldout(p) for p in heldout) and not any(is_heldout(p) for p in train)
    assert len(set(heldout)) > 256
    assert 0.15 < sum(p.startswith("list") for p in heldout) / len(heldout) < 0.35
    corpus = sft_corpus(300, 5)
    assert corpus.responses == sft_corpus(300, 5).responses
    assert not set(corpus.prompts) & set(heldout)
    with pytest.raises(ValueError):
        sample_prompts(1, 0, "test")


def test_label_pairs_follow_bradley_terry():
    a, b = "animal fox . mood calm .", "animal fox . mood sad ."  # gold 2 and 0
    rows = label_pairs([DESCRIBE] * 4000, [a] * 4000, [b] * 4000, temperature=1.0, seed=0)
    wins = sum(r["chosen"] == a for r in rows) / len(rows)
    assert wins == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.02)
    rows = label_pairs([DESCRIBE] * 100, [b] * 100, [a] * 100, temperature=1e-3, seed=0)
    assert all(r["chosen"] == a and r["gold_chosen"] == 2.0 for r in rows)
    assert label_pairs([DESCRIBE, DESCRIBE], [a, ""], [a, b], temperature=1.0, seed=0) == []


def test_budgets():
    assert get_budget("small").name == "small" and get_budget("default").heldout_prompts >= 256
    assert get_budget("small").sft.steps < get_budget("default").sft.steps
    with pytest.raises(ValueError):
        get_budget("huge")
    with pytest.raises(ValueError):
        DemoBudget(name="x", heldout_prompts=100)


def test_the_pairs_budget_starts_its_rms_from_a_model_that_must_look_items_up():
    """What makes `pairs` RMs learn (RESULTS.md, issue 24): a backbone other than the SFT policy, whose
    demonstrations never follow the prompt's order (so the order cannot stand in for the lookup),
    trained well past the ~4000-step plateau before the lookup forms; the policy stays the default's."""
    pairs, default = get_budget("pairs"), get_budget("default")
    backbone = pairs.rm_backbone
    assert backbone is not None and backbone.pretrain_p_shuffle == 1.0 and backbone.pretrain_steps >= 8000
    assert backbone.key() != pairs.sft.key()
    assert pairs.sft == default.sft and pairs.ppo_steps == default.ppo_steps
    assert pairs.preference_pairs > default.preference_pairs


# ---------------------------------------------------------------------------------------------
# SFT policy and preference data (one tiny policy, trained once for the module)

TINY_SFT = SFTSettings(hidden_size=32, intermediate_size=64, pretrain_steps=30, sft_steps=10, batch_size=16)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="module")
def tiny_policy(cache_dir):
    return sft_policy(cache_dir, TINY_SFT)


def test_sft_policy_is_cached(cache_dir, tiny_policy):
    count = sft_module.TRAIN_COUNT
    stamp = (tiny_policy / "model.safetensors").stat().st_mtime_ns
    assert sft_policy(cache_dir, TINY_SFT) == tiny_policy
    assert sft_module.TRAIN_COUNT == count  # not trained again
    assert (tiny_policy / "model.safetensors").stat().st_mtime_ns == stamp
    assert TINY_SFT.key() != dataclasses.replace(TINY_SFT, seed=1).key()
    assert tiny_policy.parent == cache_dir and TINY_SFT.key() in tiny_policy.name


def test_cache_key_follows_the_task(monkeypatch):
    key = TINY_SFT.key()
    monkeypatch.setattr(sft_module, "TASK_VERSION", "another")
    assert TINY_SFT.key() != key
    monkeypatch.undo()
    monkeypatch.setattr(sft_module, "vocabulary", lambda: ["a", "b"])  # the task's code changed
    assert TINY_SFT.key() != key


def test_default_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "segppo" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir().parts[-3:] == (".cache", "segppo", "demo")


def test_sft_policy_folder_loads_with_stock_classes(tiny_policy):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    tokenizer = load_tokenizer(tiny_policy)
    assert model.config.model_type == "llama"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert json.loads((tiny_policy / "segppo.json").read_text())["kind"] == "policy"
    encoded, _ = encode_prompts([{"prompt": DESCRIBE}], tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([encoded[0].prompt_ids])).logits
    assert logits.shape[-1] == len(tokenizer)


def test_sft_training_is_deterministic():
    settings = dataclasses.replace(TINY_SFT, pretrain_steps=3, sft_steps=2)
    first, _ = sft_module.train_sft(settings)
    second, _ = sft_module.train_sft(settings)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_prepare_writes_the_demo_data(tmp_path, cache_dir, tiny_policy):
    budget = dataclasses.replace(
        DemoBudget.small(), sft=TINY_SFT, preference_pairs=96, eval_preference_pairs=16, ppo_prompts=40
    )
    data = prepare(tmp_path / "run", budget, cache_dir=cache_dir, seed=0)
    assert data.policy == tiny_policy

    train = [json.loads(line) for line in data.prompts_train.read_text().splitlines()]
    heldout = [json.loads(line) for line in data.prompts_heldout.read_text().splitlines()]
    assert len(train) == 40 and len(heldout) == 256 and all(set(r) == {"prompt"} for r in train + heldout)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}

    splits = load_splits(data.preferences)
    assert set(splits) == {"train", "test"}
    rows = list(load_rows(data.preferences / "train.jsonl"))
    assert len(rows) == 96
    for row in rows:
        assert {"prompt", "chosen", "rejected"} <= set(row)
        assert all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected"))
        assert row["chosen"] != row["rejected"] and not is_heldout(row["prompt"])
        assert row["gold_chosen"] == gold_reward(row["prompt"], row["chosen"])
    assert all(is_heldout(r["prompt"]) for r in load_rows(data.preferences / "test.jsonl"))
    # Bradley-Terry labels agree with the gold reward more often than not
    decided = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    assert sum(r["gold_chosen"] > r["gold_rejected"] for r in decided) > 0.6 * len(decided)

    pairs, report = encode_preferences(rows, load_tokenizer(data.policy))
    assert report.kept == 96 and report.layout == "prompt_response"

    summary = json.loads((tmp_path / "run" / "data" / "task_report.json").read_text())
    gold = summary["gold_heldout"]
    assert gold["sft_policy"]["n"] == 256 and 0 <= gold["sft_policy"]["eos_rate"] <= 1
    assert gold["oracle"]["mean"] > gold["better_demonstrator_p0.9"]["mean"] > gold["demonstrator"]["mean"]
    assert set(summary["seconds"]) == {"sft", "prompts", "preferences", "measure"}
    # the same seed gives the same data (the policy is cached)
    again = prepare(tmp_path / "again", budget, cache_dir=cache_dir, seed=0, measure=False)
    assert (again.preferences / "train.jsonl").read_text() == (data.preferences / "train.jsonl").read_text()


@pytest.mark.slow
def test_small_budget_sft_writes_well_formed_responses(tmp_path):
    """The CI budget's policy (about 15 s to train): responses end with EOS and follow the grammar."""
    policy = sft_policy(tmp_path, DemoBudget.small().sft)
    stats, samples = policy_gold(policy, sample_prompts(256, 0, "heldout"), seed=0)
    assert stats.eos_rate > 0.95
    assert 8 <= stats.mean_words <= 30
    pairs = zip(samples.prompts, samples.responses, strict=True)
    phrases = [p for q, r in pairs for p in phrase_rewards(q, r)]
    assert sum(p.kind != "malformed" for p in phrases) > 0.8 * len(phrases)
