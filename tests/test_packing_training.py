"""`--packing` in RM training and the PPO update: the same losses and weights as the padded path."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import FILLER, tiny_rm_config

from segppo.data.packing import pack_preferences
from segppo.models import load_tokenizer
from segppo.rm.trainer import prepare_preferences, train_reward_model
from segppo.tracking import read_metrics


def ragged_rows(path, n: int = 120) -> str:
    """The Paris/Lyon set with prompts of 0 to 12 extra filler words and responses of 1 to 14, so
    that sequences differ in length and several fit in a row of the padded width."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        words = rng.randint(1, 14)
        filler = [rng.choice(FILLER) for _ in range(words)]
        at = rng.randrange(words)
        chosen, rejected = list(filler), list(filler)
        chosen[at], rejected[at] = "Paris", "Lyon"
        prompt = " ".join(["Name the capital."] + [rng.choice(FILLER) for _ in range(rng.randint(0, 12))])
        rows.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    Path(path).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ragged_preferences(tmp_path_factory):
    return ragged_rows(tmp_path_factory.mktemp("ragged") / "prefs.jsonl")


def _train_losses(cfg) -> list[float]:
    train_reward_model(cfg)
    return [row["loss"] for row in read_metrics(cfg.output_dir, split="train")]


def _assert_same_run(padded, packed, losses_padded, losses_packed):
    assert len(losses_packed) == len(losses_padded) == padded.max_steps
    assert losses_packed == pytest.approx(losses_padded, rel=1e-5, abs=1e-7)
    a = load_file(padded.output_dir / "model" / "model.safetensors")
    b = load_file(packed.output_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            b[name], a[name], rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
    final_padded = read_metrics(padded.output_dir, split="eval")[-1]
    final_packed = read_metrics(packed.output_dir, split="eval")[-1]
    assert final_packed["accuracy"] == final_padded["accuracy"]


def test_the_micro_batches_really_pack(tiny_lm_dir, ragged_preferences, tmp_path):
    cfg = tiny_rm_config(tiny_lm_dir, ragged_preferences, tmp_path / "r")
    data = prepare_preferences(cfg, load_tokenizer(tiny_lm_dir))
    pairs = data.train[: cfg.micro_batch_size]
    packed = pack_preferences(pairs, pad_token_id=0)  # rows of the padded width, as on CPU
    assert packed.input_ids.shape[0] < 2 * len(pairs)  # rows hold several sequences


@pytest.mark.parametrize("granularity", ["segment", "token", "bandit"])
def test_rm_train_packing_matches_padded(tiny_lm_dir, ragged_preferences, tmp_path, granularity):
    padded = tiny_rm_config(
        tiny_lm_dir,
        ragged_preferences,
        tmp_path / "padded",
        granularity=granularity,
        max_steps=3,
        margin=True,
    )
    packed = dataclasses.replace(padded, output=str(tmp_path / "packed"), packing=True)
    _assert_same_run(padded, packed, _train_losses(padded), _train_losses(packed))


def test_rm_train_packing_on_two_ranks_matches_padded(tiny_lm_dir, ragged_preferences, tmp_path):
    padded = tiny_rm_config(
        tiny_lm_dir, ragged_preferences, tmp_path / "padded", max_steps=2, zero_stage=2, nproc=2
    )
    packed = dataclasses.replace(padded, output=str(tmp_path / "packed"), packing=True)
    _assert_same_run(padded, packed, _train_losses(padded), _train_losses(packed))


@pytest.fixture(scope="module")
def ppo_inputs(tiny_lm_dir, ragged_preferences, tmp_path_factory):
    """A briefly trained segment RM, and prompts of several lengths (so that rows pack)."""
    rm = tiny_rm_config(tiny_lm_dir, ragged_preferences, tmp_path_factory.mktemp("rm") / "run", max_steps=3)
    train_reward_model(rm)
    prompts = [
        "Name the capital.",
        # 83 tokens: a row of its width holds two of the short prompts with their responses.
        "What is the capital of France, the country of cheese, wine, bread, rivers, hills and very long "
        "lunches in the sun?",
        "City?",
    ]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts * 20) + "\n")
    return str(rm.output_dir), str(path)


def test_ppo_update_packing_matches_padded(tiny_lm_dir, ppo_inputs, tmp_path):
    from test_ppo import ppo_config

    from segppo.ppo.trainer import train_ppo

    reward_model, prompts = ppo_inputs
    padded = ppo_config(
        tiny_lm_dir, reward_model, prompts, tmp_path / "padded", max_new_tokens=16, max_prompt_len=96
    )
    packed = dataclasses.replace(padded, output=str(tmp_path / "packed"), packing=True)
    train_ppo(padded)
    train_ppo(packed)
    want = read_metrics(padded.output_dir, split="train")
    got = read_metrics(packed.output_dir, split="train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for w, g in zip(want, got, strict=True):
        for key in ("reward", "kl", "response_length", "policy_loss", "value_loss", "approx_kl", "entropy"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (w["step"], key)
    a = load_file(padded.output_dir / "policy" / "model.safetensors")
    b = load_file(packed.output_dir / "policy" / "model.safetensors")
    # Eight Adam steps at lr 1e-2 turn float rounding in the gradients into ~1e-5 weight changes.
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("train_batch_size", [16, 8])  # one optimizer step per epoch (values_in_update), two
def test_ppo_packs_each_micro_batch_once(tiny_lm_dir, ppo_inputs, tmp_path, monkeypatch, train_batch_size):
    """The actor's and the critic's passes of an optimizer step run over the same micro-batches,
    and with one step per epoch the critic's first epoch runs over the first update's: each is
    packed once, not once per model."""
    from test_ppo import ppo_config

    import segppo.ppo.trainer as trainer

    packs = []
    pack = trainer.pack_response_batch
    monkeypatch.setattr(trainer, "pack_response_batch", lambda *a, **k: packs.append(1) or pack(*a, **k))
    reward_model, prompts = ppo_inputs
    cfg = ppo_config(
        tiny_lm_dir, reward_model, prompts, tmp_path / "packed", max_new_tokens=16, max_prompt_len=96,
        packing=True, train_batch_size=train_batch_size, max_steps=1,
    )  # fmt: skip
    assert trainer.values_in_update(cfg) == (train_batch_size == 16)
    trainer.train_ppo(cfg)
    # 16 responses in micro-batches of 8, over 2 epochs: 4 micro-batches, whatever the updates.
    assert len(packs) == cfg.ppo_epochs * 16 // cfg.micro_train_batch_size == 4
