"""Records that say what ran (issue 20 item 5): every field of `segppo.json` and `run_config.json`,
read back against the run that wrote it. A field without a check here fails the test, so a new
record field comes with its check."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny import tiny_ppo_config, tiny_rm_config, write_preferences

from segppo.config import RMEvalConfig
from segppo.data import ChatFormat, collate_preferences
from segppo.kernels import segment_rewards
from segppo.models import load_policy, load_tokenizer
from segppo.models.metadata import segppo_version
from segppo.ppo.trainer import train_ppo
from segppo.rm.evaluate import evaluate_reward_model
from segppo.rm.segment_survey import sample_indices
from segppo.rm.trainer import prepare_preferences, train_reward_model
from segppo.segment_stats import (
    Candidates,
    SegmentStats,
    auto_threshold,
    candidate_entropies,
    segment_lengths,
)
from segppo.segments import segmenter_entropy
from segppo.tracking import read_metrics


def _json(path):
    return json.loads(path.read_text())


def _check_every_field(record: dict, expected: dict, where: str) -> None:
    assert sorted(record) == sorted(expected), f"{where}: fields without a check, or checks without a field"
    for name, want in expected.items():
        got = record[name]
        if callable(want):
            assert want(got), f"{where}: {name} = {got!r}"
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), f"{where}: {name}"
        else:
            assert got == want, f"{where}: {name}"


def _same(got: dict, want: dict) -> bool:
    """Equal keys; numbers equal to 1e-6 (relative), anything else exactly."""
    if sorted(got) != sorted(want):
        return False
    number = (int, float)
    return all(
        got[k] == pytest.approx(want[k], rel=1e-6) if isinstance(want[k], number) else got[k] == want[k]
        for k in want
    )


def _run_config_expected(cfg, extra: dict) -> dict:
    values = {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in dataclasses.asdict(cfg).items()}
    return {**values, **extra}


def _segmentation_by_hand(cfg):
    """τ and the statistics of `cfg`'s sample, computed here from the segmenter, not read from the run."""
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_preferences(cfg, tokenizer)
    segmenter = load_policy(cfg.model).eval()
    chosen = sample_indices(len(data.train), cfg.segment_sample, cfg.seed, world_size=1)
    batches = []
    for start in range(0, len(chosen), 16):
        batch = collate_preferences(
            [data.train[i] for i in chosen[start : start + 16]], tokenizer.pad_token_id
        )
        entropy = segmenter_entropy(
            segmenter, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len
        )
        batches.append((entropy, batch.response_mask, batch.has_eos))
    parts = [candidate_entropies(*b) for b in batches]
    entropy = np.concatenate([p.entropy for p in parts])
    tokens, responses = sum(p.tokens for p in parts), sum(p.responses for p in parts)
    choice = auto_threshold(Candidates(entropy, tokens, responses), cfg.segment_length)
    lengths, counts = [], []
    for e, mask, has_eos in batches:
        ends = segment_rewards(
            torch.zeros_like(e), e, mask, granularity="segment", threshold=choice.threshold,
            has_eos=has_eos, distribute="end",
        ).ends  # fmt: skip
        length, count = segment_lengths(ends)
        lengths.append(length)
        counts.append(count)
    stats = SegmentStats.from_lengths(np.concatenate(lengths), np.concatenate(counts))
    return choice, stats, data, tokenizer, len(chosen)


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    """A folder with train.jsonl and test.jsonl: the dataset's own eval split is "test"."""
    folder = tmp_path_factory.mktemp("prefs")
    write_preferences(folder / "train.jsonl", n=96, seed=1)
    write_preferences(folder / "test.jsonl", n=16, seed=2)
    return str(folder)


@pytest.fixture(scope="module")
def segment_run(tiny_lm_dir, dataset_folder, tmp_path_factory):
    cfg = tiny_rm_config(
        tiny_lm_dir, dataset_folder, tmp_path_factory.mktemp("rm") / "run", max_steps=2, segment_sample=48
    )
    train_reward_model(cfg)
    return cfg


def test_segment_rm_records(segment_run):
    cfg = segment_run
    choice, stats, data, tokenizer, sampled = _segmentation_by_hand(cfg)
    final = read_metrics(cfg.output_dir, split="eval")[-1]
    recorded = _json(cfg.output_dir / "model" / "segppo.json")
    segment_stats = {**stats.to_dict(), "sample_pairs": sampled}
    _check_every_field(
        recorded,
        {
            "kind": "reward_model",
            "granularity": "segment",
            "threshold": choice.threshold,
            "threshold_choice": lambda got: _same(got, choice.to_dict()),
            "segment_stats": lambda got: _same(got, segment_stats),
            "segmenter": cfg.model,
            "normalizer": None,
            "score_mean": final["score_mean"],
            "score_std": final["score_std"],
            **ChatFormat(tokenizer, cfg.chat_template).metadata_fields(),
            "data": {
                "dataset": cfg.dataset,
                "split": "train",
                "eval_split": "test",  # the folder's test.jsonl
                "eval_fraction": None,  # nothing was held out of train
                "seed": cfg.seed,
                "train_pairs": 96,
                "eval_pairs": 16,
                "skipped_rows": 0,
            },
            "base_model": cfg.model,
            "segppo_version": segppo_version(),
        },
        "rm segppo.json",
    )
    assert final["num_pairs"] == 16 and len(data.eval) == 16  # evaluated on the test split
    survey = {k: recorded[k] for k in ("granularity", "threshold", "threshold_choice", "segment_stats")}
    run_config = _json(cfg.output_dir / "run_config.json")
    _check_every_field(run_config, _run_config_expected(cfg, {"segmentation": survey}), "rm run_config.json")


def test_bandit_rm_records_no_threshold(tiny_lm_dir, tmp_path):
    data = write_preferences(tmp_path / "prefs.jsonl", n=60)
    cfg = tiny_rm_config(tiny_lm_dir, data, tmp_path / "run", granularity="bandit", max_steps=1)
    train_reward_model(cfg)
    recorded = _json(cfg.output_dir / "model" / "segppo.json")
    assert recorded["granularity"] == "bandit"
    assert recorded["threshold"] is None and recorded["threshold_choice"] is None
    assert recorded["segmenter"] is None
    stats = recorded["segment_stats"]  # one segment per response, as long as the response
    assert (
        stats["segments_per_response"] == 1 and stats["mean_length"] == stats["tokens"] / stats["responses"]
    )
    assert recorded["data"]["eval_split"] is None and recorded["data"]["eval_fraction"] == 0.2
    assert recorded["data"]["train_pairs"] == 48 and recorded["data"]["eval_pairs"] == 12
    evaluated = evaluate_reward_model(RMEvalConfig(model=str(cfg.output_dir), dataset=data, max_len=64))
    assert evaluated["granularity"] == "bandit" and evaluated["threshold"] is None


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Name city {i}."}) + "\n" for i in range(16)))
    return str(path)


def test_ppo_records(tiny_lm_dir, segment_run, prompts_file, tmp_path):
    rm = segment_run.output_dir
    cfg = tiny_ppo_config(tiny_lm_dir, (str(rm), prompts_file), tmp_path / "ppo", max_steps=1)
    train_ppo(cfg)
    rm_record = _json(rm / "model" / "segppo.json")
    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat.from_metadata(tokenizer, _metadata(rm))
    recorded = _json(cfg.output_dir / "policy" / "segppo.json")
    _check_every_field(
        recorded,
        {
            "kind": "policy",
            "granularity": "segment",
            "threshold": rm_record["threshold"],  # the RM's τ: PPO segments as the RM was trained
            "threshold_choice": None,
            "segment_stats": None,
            "segmenter": cfg.policy,  # the reference, which PPO takes entropy from
            "normalizer": None,  # the RM has none and none was given
            "score_mean": None,
            "score_std": None,
            **chat.metadata_fields(),
            "data": {"prompts": cfg.prompts, "split": "train", "reward_model": cfg.reward_model, "steps": 1},
            "base_model": cfg.policy,
            "segppo_version": segppo_version(),
        },
        "policy segppo.json",
    )
    sampling = {
        "decoding": "sampling",  # PPO refuses temperature 0 (greedy)
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": None,
        "max_new_tokens": cfg.max_new_tokens,
        "stop_token_ids": chat.stop_token_ids,
        "checkpoint_generation_config": "not applied",
    }
    # What the prompts were rendered with: the RM's recorded template (no option was given).
    rendered = {k: chat.metadata_fields()[k] for k in ("chat_template", "chat_template_kwargs")}
    run_config = _json(cfg.output_dir / "run_config.json")
    expected = _run_config_expected(cfg, {"sampling": sampling, **rendered})
    _check_every_field(run_config, expected, "ppo run_config.json")


def _metadata(rm_run):
    from segppo.models import SegppoMetadata

    return SegppoMetadata.load(rm_run / "model" / "segppo.json")


def test_ppo_with_a_bandit_rm_records_no_threshold(tiny_lm_dir, tmp_path, prompts_file):
    data = write_preferences(tmp_path / "prefs.jsonl", n=60)
    rm = tiny_rm_config(tiny_lm_dir, data, tmp_path / "rm", granularity="bandit", max_steps=1)
    train_reward_model(rm)
    cfg = tiny_ppo_config(tiny_lm_dir, (str(rm.output_dir), prompts_file), tmp_path / "ppo", max_steps=1)
    train_ppo(cfg)
    recorded = _json(cfg.output_dir / "policy" / "segppo.json")
    assert recorded["granularity"] == "bandit" and recorded["threshold"] is None
    assert recorded["segmenter"] is None  # a bandit reward needs no entropy
