"""ZeRO-3 loading on 2 CPU ranks: each rank's peak host memory while loading a ~30 MB model.

Three loads, each in fresh ranks: "full" (every rank `from_pretrained`s the whole model),
"transformers" (`from_pretrained` inside `partitioned_loading`: partitioned, but every rank reads
the whole checkpoint) and "segppo" (`from_pretrained_partitioned`: rank 0 reads one tensor at a
time)."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import pytest
import torch

from segppo.distributed import deepspeed_config, init_distributed, launch, shutdown
from tests.tiny import tiny_config

NPROC = 2


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def _load_on_rank(folder: str, warmup: str, mode: str, out: str) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM

    from segppo.models.zero3 import (
        from_pretrained_partitioned,
        is_partitioned,
        local_numel,
        partitioned_loading,
    )

    def load(path):
        if mode == "segppo":
            return from_pretrained_partitioned(AutoModelForCausalLM, path, config, dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    info = init_distributed()
    stage = 0 if mode == "full" else 3
    config = deepspeed_config(micro_batch_size=1, grad_accum=1, zero_stage=stage, bf16=False, grad_clip=None)
    with partitioned_loading(config):
        # A first small load pays the one-time costs (lazy imports, DeepSpeed's set-up) that do
        # not grow with the model, so the measured load shows what does.
        del_me = load(warmup)
        del del_me
        gc.collect()
        _reset_peak()
        before = _status_mib("VmRSS")
        model = load(folder)
        loaded = _status_mib("VmRSS")
        # Read every weight this rank holds: weights still backed by the checkpoint's memory map
        # only count once touched, which the first forward (or `.to(device)`) does anyway.
        for p in model.parameters():
            float((p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().double().sum())
        peak = _status_mib("VmHWM")
        partitioned = is_partitioned(model)
        held = local_numel(model)
        # The partitions put back together are the checkpoint's weights.
        name, param = (
            "model.layers.1.mlp.down_proj.weight",
            dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"],
        )
        with deepspeed.zero.GatheredParameters([param], enabled=partitioned):
            checksum = float(param.double().sum())
    record = dict(
        before=before,
        loaded=loaded,
        peak=peak,
        partitioned=partitioned,
        held=held,
        checksum=checksum,
        name=name,
    )
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(record))
    shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("zero3") / "model"
    torch.manual_seed(0)
    config = tiny_config("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=8)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    numel = sum(p.numel() for p in model.parameters())
    checksum = float(model.model.layers[1].mlp.down_proj.weight.detach().double().sum())
    warmup = folder.parent / "warmup"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(warmup)
    return str(folder), str(warmup), numel, checksum


def _run(folder, warmup, mode, tmp_path):
    out = tmp_path / mode
    out.mkdir()
    launch(_load_on_rank, folder, warmup, mode, str(out), nproc=NPROC, log_dir=out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(NPROC)]


@pytest.mark.slow  # three 2-rank launches: about 100 s on 2 shared cores
def test_zero3_load_is_partitioned_and_peaks_lower(checkpoint, tmp_path):
    folder, warmup, numel, checksum = checkpoint
    full_mib = numel * 4 / 2**20
    assert full_mib > 25  # large enough for the partitions to show in the RSS
    runs = {mode: _run(folder, warmup, mode, tmp_path) for mode in ("full", "transformers", "segppo")}
    for mode, records in runs.items():
        for record in records:
            if mode == "full":
                assert not record["partitioned"] and record["held"] == numel
            else:
                assert record["partitioned"] and record["held"] <= numel / NPROC + 1024 * NPROC
            # The partitions put back together are the checkpoint's weights.
            assert record["checksum"] == pytest.approx(checksum, rel=1e-6, abs=1e-6), mode
    # "Peak host memory at load": the growth of a rank's peak RSS (VmHWM, reset just before the load)
    # over its RSS then, so the imports, tokenizer and DeepSpeed set-up are not counted.
    peaks = {mode: max(r["peak"] - r["before"] for r in records) for mode, records in runs.items()}
    print(
        f"\nmodel {full_mib:.1f} MiB; peak RSS increase while loading, max over {NPROC} ranks: "
        + ", ".join(f"{mode} {peak:.1f} MiB ({peak / peaks['full']:.2f}x)" for mode, peak in peaks.items())
    )
    for mode, records in runs.items():  # where it goes: held after the load, and the peak above that
        print(
            f"{mode}: "
            + "; ".join(
                f"rank {i} holds {r['loaded'] - r['before']:.1f} MiB, peak +{r['peak'] - r['loaded']:.1f}"
                for i, r in enumerate(records)
            )
        )
    # Half a model is the floor with 2 ranks; ~6 MiB of the rest does not grow with the model
    # (measured 0.60-0.63x at this size). The target, 0.6x, is for models of real size.
    assert peaks["segppo"] <= 0.7 * peaks["full"], runs


def test_nested_partitioned_loading_keeps_the_outer_registration():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from segppo.models.zero3 import partitioned_loading

    init_distributed()
    config = deepspeed_config(**_args())
    with partitioned_loading(config):
        with partitioned_loading(config):
            assert is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()
    with partitioned_loading(deepspeed_config(**{**_args(), "zero_stage": 2})) as registered:
        assert registered is None and not is_deepspeed_zero3_enabled()


def _args():
    return dict(micro_batch_size=1, grad_accum=1, zero_stage=3, bf16=False, grad_clip=None)


# -- wired into the trainers: `--zero-stage 3` builds every model partitioned -------------------


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow  # two 2-rank RM runs
def test_rm_train_under_zero3_equals_a_plain_load(tiny_lm_dir, preferences_file, tmp_path):
    """A segment RM (trained model + frozen segmenter) on 2 ranks: ZeRO-3, its models built
    partitioned, trains as ZeRO-2 does with every model loaded whole."""
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model
    from segppo.tracking import read_metrics

    plain = tiny_rm_config(
        tiny_lm_dir, preferences_file, tmp_path / "plain", max_steps=3, zero_stage=2, nproc=2
    )
    partitioned = dataclasses.replace(plain, output=str(tmp_path / "partitioned"), zero_stage=3)
    train_reward_model(plain)
    train_reward_model(partitioned)
    losses = lambda cfg: [r["loss"] for r in read_metrics(cfg.output_dir, split="train")]  # noqa: E731
    assert losses(partitioned) == pytest.approx(losses(plain), rel=1e-5)
    a, b = _weights(plain.output_dir / "model"), _weights(partitioned.output_dir / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # an RM, then two 2-rank PPO runs
def test_ppo_train_under_zero3_equals_a_plain_load(tiny_lm_dir, preferences_file, tmp_path):
    """Actor, critic (from the RM), reference and RM built partitioned under ZeRO-3 on 2 ranks:
    the same step as ZeRO-2 with every model loaded whole."""
    from tiny import tiny_ppo_config, tiny_rm_config

    from segppo.ppo.trainer import train_ppo
    from segppo.rm.trainer import train_reward_model
    from segppo.tracking import read_metrics

    train_reward_model(tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "rm", max_steps=6))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["Name the capital.", "Which city?"] * 16)
    )
    inputs = (str(tmp_path / "rm"), str(prompts))
    plain = tiny_ppo_config(tiny_lm_dir, inputs, tmp_path / "plain", max_steps=1, zero_stage=2, nproc=2)
    partitioned = dataclasses.replace(plain, output=str(tmp_path / "partitioned"), zero_stage=3)
    train_ppo(plain)
    train_ppo(partitioned)
    a = read_metrics(plain.output_dir, split="train")[0]
    b = read_metrics(partitioned.output_dir, split="train")[0]
    for key in ("reward", "kl", "response_length", "policy_loss", "value_loss", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa, wb = _weights(plain.output_dir / "policy"), _weights(partitioned.output_dir / "policy")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
