"""ZeRO offload: --offload-optimizer (the trained models' optimizer states on CPU) and
--ref-offload / --rm-offload (the frozen models' ZeRO-3 partitions on CPU). On CPU ranks the
"device" is the CPU too, so these tests check that each flag reaches DeepSpeed and that a run with
it trains exactly as one without; what offload saves on a GPU is in README's memory section."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_rm_config
from transformers import AutoModelForCausalLM

from segppo.config import PPOConfig, RMConfig
from segppo.distributed import deepspeed_config, frozen_on_device, init_distributed, loading_config
from segppo.tracking import read_metrics
from tests.tiny import tiny_config


def test_the_deepspeed_config_holds_the_offload_sections():
    args = dict(micro_batch_size=2, grad_accum=1, bf16=False, grad_clip=1.0)
    plain = deepspeed_config(zero_stage=2, **args)
    assert (
        "offload_optimizer" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain
    )
    optimizer = deepspeed_config(zero_stage=2, offload_optimizer=True, **args)
    assert optimizer["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert optimizer["zero_force_ds_cpu_optimizer"] is False  # segppo's torch AdamW steps on the CPU
    params = deepspeed_config(zero_stage=3, offload_params=True, **args)
    assert params["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert loading_config(zero_stage=3, bf16=False, offload=True)["zero_optimization"]["offload_param"]
    with pytest.raises(ValueError, match="optimizer offload needs ZeRO"):
        deepspeed_config(zero_stage=0, offload_optimizer=True, **args)
    with pytest.raises(ValueError, match="parameter offload needs ZeRO stage 3"):
        deepspeed_config(zero_stage=2, offload_params=True, **args)


def test_offload_flags_are_checked():
    ppo = dict(policy="p", reward_model="r", prompts="x", output="o")
    for flag in ("ref_offload", "rm_offload"):
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} .* needs --zero-stage 3"):
            PPOConfig(**ppo, zero_stage=2, **{flag: True})
    with pytest.raises(ValueError, match="--offload-optimizer needs ZeRO"):
        RMConfig(model="m", dataset="d", output="o", zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="the reference is the actor's base"):
        PPOConfig(**ppo, zero_stage=3, lora_rank=4, ref_offload=True)


def test_each_engine_gets_its_offload():
    from segppo.optim import training_engine

    info = init_distributed()
    torch.manual_seed(0)
    frozen = frozen_on_device(
        AutoModelForCausalLM.from_config(tiny_config()), info, zero_stage=3, bf16=False, offload=True
    )
    assert frozen.zero_offload_param() is not None and frozen.zero_offload_param().device == "cpu"
    cfg = RMConfig(model="m", dataset="d", output="o", zero_stage=2, offload_optimizer=True)
    engine, _ = training_engine(
        AutoModelForCausalLM.from_config(tiny_config()),
        lr=1e-3,
        total_steps=1,
        micro_batch_size=1,
        grad_accum=1,
        config=cfg,
    )
    assert engine.zero_cpu_offload()
    ids = torch.tensor([[5, 6, 7, 8]])
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()  # the offloaded AdamW steps


@pytest.mark.slow  # two 2-rank RM runs
def test_rm_train_with_offload_optimizer_equals_without(tiny_lm_dir, preferences_file, tmp_path):
    plain = tiny_rm_config(
        tiny_lm_dir, preferences_file, tmp_path / "plain", max_steps=3, zero_stage=2, nproc=2
    )
    offloaded = dataclasses.replace(plain, output=str(tmp_path / "offloaded"), offload_optimizer=True)
    _train_rm(plain)
    _train_rm(offloaded)
    losses = lambda cfg: [r["loss"] for r in read_metrics(cfg.output_dir, split="train")]  # noqa: E731
    assert losses(offloaded) == pytest.approx(losses(plain), rel=1e-5)
    a = load_file(plain.output_dir / "model" / "model.safetensors")
    b = load_file(offloaded.output_dir / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def _train_rm(cfg):
    from segppo.rm.trainer import train_reward_model

    train_reward_model(cfg)


@pytest.mark.slow  # an RM, then two 2-rank ZeRO-3 PPO runs
def test_ppo_with_every_offload_equals_without(tiny_lm_dir, preferences_file, tmp_path):
    """--ref-offload, --rm-offload and --offload-optimizer together on 2 ZeRO-3 ranks: the same
    step as without them."""
    from tiny import tiny_ppo_config

    from segppo.ppo.trainer import train_ppo

    _train_rm(tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "rm", max_steps=6))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["Name the capital.", "Which city?"] * 16)
    )
    inputs = (str(tmp_path / "rm"), str(prompts))
    plain = tiny_ppo_config(tiny_lm_dir, inputs, tmp_path / "plain", max_steps=1, zero_stage=3, nproc=2)
    offloaded = dataclasses.replace(
        plain, output=str(tmp_path / "offloaded"), ref_offload=True, rm_offload=True, offload_optimizer=True
    )
    train_ppo(plain)
    train_ppo(offloaded)
    a = read_metrics(plain.output_dir, split="train")[0]
    b = read_metrics(offloaded.output_dir, split="train")[0]
    for key in ("reward", "kl", "response_length", "policy_loss", "value_loss", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa = load_file(plain.output_dir / "policy" / "model.safetensors")
    wb = load_file(offloaded.output_dir / "policy" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
