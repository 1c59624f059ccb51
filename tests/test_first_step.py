"""The first optimizer step trains, and the lr logged for a step is the lr it used (issue 20 item 4).

The lr an optimizer step really used is read from the optimizer itself: a global step pre-hook
(`torch.optim.optimizer.register_optimizer_step_pre_hook`) records `param_groups[0]["lr"]` each time
any optimizer steps, under DeepSpeed as without it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_ppo_config, tiny_rm_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

from segppo.optim import adamw, cosine_schedule
from segppo.ppo.trainer import train_ppo
from segppo.rm.trainer import train_reward_model
from segppo.tracking import read_metrics


@pytest.fixture
def optimizer_lrs():
    """`{id(optimizer): [lr of each of its steps]}` for the optimizers stepped during the test."""
    seen: dict[int, list[float]] = {}

    def record(optimizer, args, kwargs):
        seen.setdefault(id(optimizer), []).append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(record)
    yield seen
    handle.remove()


def _lrs(model, steps: int, warmup_ratio: float, min_lr_ratio: float = 0.1) -> list[float]:
    optimizer = adamw(model, lr=1.0, weight_decay=0.0)
    scheduler = cosine_schedule(
        optimizer, total_steps=steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio
    )
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])  # what this step's optimizer.step() uses
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 100])
def test_no_step_runs_at_lr_zero(steps):
    model = torch.nn.Linear(2, 2)
    lrs = _lrs(model, steps, warmup_ratio=0.1)
    assert min(lrs) > 0, lrs
    warmup = min(math.ceil(0.1 * steps), steps - 1)  # a one-step run has no warmup: it uses the peak
    assert lrs[warmup] == pytest.approx(1.0)  # the peak right after the warmup
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1], strict=True))  # a rising ramp
    if steps > warmup + 1:
        assert lrs[-1] == pytest.approx(0.1)  # the cosine ends at its floor on the last step
    assert _lrs(model, 1, warmup_ratio=0.0) == [1.0]


def _moved(base_folder, folder, names=None) -> float:
    base, trained = load_file(f"{base_folder}/model.safetensors"), load_file(f"{folder}/model.safetensors")
    keys = [k for k in trained if k in base and (names is None or names(k))]
    assert keys
    return sum((trained[k] - base[k]).abs().sum().item() for k in keys)


def test_rm_step_one_trains_and_logs_its_lr(tiny_lm_dir, preferences_file, tmp_path, optimizer_lrs):
    # warmup_ratio 0.03 of 3 steps: one warmup step, which ran at lr 0 before the fix.
    cfg = tiny_rm_config(
        tiny_lm_dir, preferences_file, tmp_path / "rm", warmup_ratio=0.03, max_steps=3, save_every=1
    )
    train_reward_model(cfg)
    step_1 = cfg.output_dir / "checkpoints" / "step-1"
    assert _moved(tiny_lm_dir, step_1, names=lambda k: k.startswith("model.")) > 0  # the backbone moved
    (used,) = optimizer_lrs.values()
    logged = [row["lr"] for row in read_metrics(cfg.output_dir, split="train")]
    assert len(used) == 3 and min(used) > 0
    assert logged == pytest.approx(used, rel=1e-12)


@pytest.fixture(scope="module")
def ppo_inputs(tiny_lm_dir, preferences_file, tmp_path_factory):
    rm = tmp_path_factory.mktemp("rm") / "run"
    train_reward_model(tiny_rm_config(tiny_lm_dir, preferences_file, rm, granularity="token", max_steps=2))
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name city {i}."}) + "\n" for i in range(32)))
    return str(rm), str(prompts)


def test_ppo_step_one_trains_and_logs_its_lr(tiny_lm_dir, ppo_inputs, tmp_path, optimizer_lrs):
    # Two updates a step (rollout 16, train batch 8): the logged lr is the step's last update's.
    cfg = tiny_ppo_config(
        tiny_lm_dir,
        ppo_inputs,
        tmp_path / "ppo",
        warmup_ratio=0.03,
        max_steps=2,
        save_every=1,
        train_batch_size=8,
        micro_train_batch_size=4,
    )
    train_ppo(cfg)
    assert _moved(tiny_lm_dir, cfg.output_dir / "checkpoints" / "step-1") > 0
    actor, critic = optimizer_lrs.values()  # the actor steps first in every update
    assert len(actor) == len(critic) == 4 and min(actor) > 0 and min(critic) > 0
    rows = read_metrics(cfg.output_dir, split="train")
    assert [row["actor_lr"] for row in rows] == pytest.approx(actor[1::2], rel=1e-12)
    assert [row["critic_lr"] for row in rows] == pytest.approx(critic[1::2], rel=1e-12)


def test_rm_max_steps_past_the_data_continues_into_another_epoch(tiny_lm_dir, tmp_path, capsys):
    """As Hugging Face Trainer's `max_steps` (TRL's trainers inherit it): the number of steps, taken
    through as many passes over the data as it needs, said in one line up front."""
    from tiny import write_preferences

    data = write_preferences(tmp_path / "prefs.jsonl", n=40)  # 32 training pairs: 2 steps of 16
    cfg = tiny_rm_config(tiny_lm_dir, data, tmp_path / "rm", max_steps=3, granularity="token")
    train_reward_model(cfg)
    rows = read_metrics(cfg.output_dir, split="train")
    assert [(row["step"], row["epoch"]) for row in rows] == [(1, 0), (2, 0), (3, 1)]
    err = capsys.readouterr().err
    assert "--max-steps 3 goes past 1 epoch of 2 steps: training continues into epoch 2" in err


def test_ppo_max_steps_past_the_prompts_continues_into_another_episode(
    tiny_lm_dir, ppo_inputs, tmp_path, capsys
):
    cfg = tiny_ppo_config(tiny_lm_dir, ppo_inputs, tmp_path / "ppo", max_steps=3)  # 32 prompts, 16 a step
    train_ppo(cfg)
    assert [row["step"] for row in read_metrics(cfg.output_dir, split="train")] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "--max-steps 3 goes past 1 episode of 2 steps: training continues into episode 2" in err


def test_prompts_and_pairs_left_out_of_each_pass_are_said(tiny_lm_dir, ppo_inputs, tmp_path, capsys):
    """A pass takes whole batches of its shuffle; the rest sat out of every pass without a word
    (with 1500 prompts and --rollout-batch-size 1024, a third of the prompts each episode)."""
    from tiny import write_preferences

    rm, _ = ppo_inputs
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name city {i}."}) + "\n" for i in range(37)))
    train_ppo(tiny_ppo_config(tiny_lm_dir, (rm, str(prompts)), tmp_path / "ppo", max_steps=1))
    err = " ".join(capsys.readouterr().err.split())  # as one line, whatever the terminal's width
    assert "37 prompts make 2 rollouts of 16 per episode; 5 prompts sit out each episode" in err

    data = write_preferences(tmp_path / "prefs.jsonl", n=45)  # 36 training pairs: 2 steps of 16
    train_reward_model(tiny_rm_config(tiny_lm_dir, data, tmp_path / "rm", max_steps=1, granularity="token"))
    err = " ".join(capsys.readouterr().err.split())
    assert "36 training pairs make 2 steps of 16 per epoch; 4 training pairs sit out each epoch" in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("min_lr_ratio", -1.0, "--min-lr-ratio must be in \\[0, 1\\]"),
        ("min_lr_ratio", 2.0, "--min-lr-ratio must be in \\[0, 1\\]"),
        ("warmup_ratio", -0.1, "--warmup-ratio must be in \\[0, 1\\]"),
        ("warmup_ratio", 1.5, "--warmup-ratio must be in \\[0, 1\\]"),
        ("weight_decay", -0.1, "--weight-decay must be >= 0"),
        ("save_every", -1, "--save-every must be >= 0"),
    ],
)
def test_schedule_options_out_of_range_are_refused(option, value, message):
    """The cosine ends at --min-lr-ratio × the peak: at -1 the last steps ran at a negative learning
    rate (AdamW then climbs the loss), at 2 above the peak; --save-every -1 saved every step
    (`step % -1 == 0`). RM training and PPO take the same schedule options."""
    from segppo.config import PPOConfig, RMConfig

    with pytest.raises(ValueError, match=message):
        RMConfig(model="m", dataset="d", output="o", **{option: value})
    with pytest.raises(ValueError, match=message):
        PPOConfig(policy="p", reward_model="r", prompts="x", output="o", **{option: value})
