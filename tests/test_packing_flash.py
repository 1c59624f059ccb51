"""`--packing` under flash attention: what reaches the attention is one row whose sequences the
variable-length kernel keeps apart, and the numbers equal the padded layout's.

transformers 5 takes flash attention's variable-length path only for a batch of one row
(`_is_packed_sequence`) or when given `cu_seq_lens`; packed rows `[R, W]` with R ≥ 2 and no mask ran
plain causal attention over each whole row, so the sequences of a row attended to each other.

On CPU there is no flash-attn, so `torch_flash` runs transformers' own flash-attention code
(`flash_attention_forward` -> `_flash_attention_forward`, its unpadding and its choice between the
plain and the variable-length kernel) with plain-torch kernels of the flash-attn API in place of the
CUDA ones, under an implementation name of its own registered as transformers registers hub flash
kernels (attention function + `flash_attention_mask`). What transformers decides is then exactly
what it decides on a GPU. The GPU test at the end runs the real `flash_attention_2`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import AttentionInterface, AutoModelForCausalLM, AutoModelForTokenClassification
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from segppo.data.chat import EncodedPair
from segppo.data.collate import collate_responses
from segppo.data.packing import (
    pack_response_batch,
    packed_critic_values,
    packed_logprobs_and_entropy,
    packing_mode,
    packs_in_one_row,
)
from segppo.models.reward_model import reward_values
from segppo.rm.trainer import score_pairs
from segppo.segments import Segmentation, logprobs_and_entropy
from tests.tiny import tiny_config

PAD = 0
# A flash-attention implementation under its own name (transformers' hub kernels are named like this).
TORCH_FLASH = "segppo-test/torch-flash-attention"


def _attention(q, k, v, causal: bool, scale):
    """One sequence, flash-attn's layout `[S, H, D]` (k/v may have fewer heads), causal aligned to the
    bottom right as flash-attn ≥ 2.1 does when the query is shorter than the keys (decoding)."""
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    mask = None
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(k.shape[1] - q.shape[1])
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


class TorchFlashKernels:
    """`flash_attn_func` and `flash_attn_varlen_func` in plain torch, recording each call."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        self.calls.append(("plain", q.shape[0], None))
        return torch.stack([_attention(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])

    def flash_attn_varlen_func(
        self,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q=None,
        max_seqlen_k=None,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
    ):
        self.calls.append(("varlen", 1, cu_seqlens_q.tolist()))
        bounds = zip(
            cu_seqlens_q[:-1].tolist(),
            cu_seqlens_q[1:].tolist(),
            cu_seqlens_k[:-1].tolist(),
            cu_seqlens_k[1:].tolist(),
            strict=True,
        )
        return torch.cat([_attention(q[a:b], k[c:d], v[c:d], causal, softmax_scale) for a, b, c, d in bounds])


@pytest.fixture
def torch_flash(monkeypatch):
    """Register TORCH_FLASH for this test; returns (kernels, what reached the attention per call)."""
    kernels = TorchFlashKernels()
    seen = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        seen.append(
            dict(
                batch=query.shape[0],
                mask=attention_mask,
                position_ids=kwargs.get("position_ids"),
                cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
            )
        )
        return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)

    # transformers' lazy import of the flash kernels, already done for this implementation name.
    for name, value in {
        "_loaded_implementation": TORCH_FLASH,
        "_flash_fn": kernels.flash_attn_func,
        "_flash_varlen_fn": kernels.flash_attn_varlen_func,
        "_flash_with_kvcache_fn": None,
        "_pad_fn": flash_utils._pad_input,
        "_unpad_fn": flash_utils._unpad_input,
        "_process_flash_kwargs_fn": flash_utils._lazy_define_process_function(kernels.flash_attn_varlen_func),
        "_process_with_kvcache_kwargs_fn": dict,
    }.items():
        monkeypatch.setattr(flash_utils, name, value)
    monkeypatch.setitem(AttentionInterface._global_mapping, TORCH_FLASH, attention)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, TORCH_FLASH, flash_attention_mask)
    return kernels, seen


def _sequences(n: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 300) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    responses = [[rng.randrange(4, 300) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    return prompts, responses, [rng.random() < 0.5 for _ in range(n)]


def _pair(model_class, arch, **overrides):
    """The same random weights under sdpa (the reference) and under TORCH_FLASH."""
    torch.manual_seed(0)
    sdpa = model_class.from_config(tiny_config(arch, **overrides), attn_implementation="sdpa").eval()
    flash = model_class.from_config(tiny_config(arch, **overrides), attn_implementation=TORCH_FLASH).eval()
    flash.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"  # (a config shared by both would follow the last)
    return sdpa, flash


def test_packing_mode_follows_what_the_attention_takes(torch_flash):
    sdpa, flash = _pair(AutoModelForCausalLM, "llama")
    eager = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    assert [packing_mode(m) for m in (sdpa, eager, flash)] == ["mask", "mask", "varlen"]
    assert packs_in_one_row(sdpa, flash) and packs_in_one_row(None, flash)
    assert not packs_in_one_row(sdpa, eager, None)


# (Not GPT-2: transformers looks for an nn.Linear in its attention to pick the float32 fallback dtype.)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt_neox"])
def test_flash_packing_reaches_the_varlen_kernel_as_one_row(torch_flash, arch):
    kernels, seen = torch_flash
    sdpa_lm, flash_lm = _pair(AutoModelForCausalLM, arch)
    sdpa_rm, flash_rm = _pair(AutoModelForTokenClassification, arch, num_labels=1, classifier_dropout=0.0)
    prompts, responses, has_eos = _sequences(7, seed=3)
    padded = collate_responses(prompts, responses, has_eos, PAD)
    mask = padded.response_mask
    packed = pack_response_batch(padded, PAD, one_row=packs_in_one_row(flash_lm, flash_rm))
    with torch.no_grad():
        want_logprobs, want_entropy = logprobs_and_entropy(
            sdpa_lm, padded.input_ids, padded.attention_mask, padded.position_ids, padded.prompt_len
        )
        want_values = reward_values(sdpa_rm, padded.input_ids, padded.attention_mask, padded.position_ids)
        want_critic = want_values[:, padded.prompt_len - 1 : -1] * mask
        kernels.calls.clear()
        seen.clear()
        got_logprobs, got_entropy = packed_logprobs_and_entropy(flash_lm, packed)
        got_critic = packed_critic_values(flash_rm, packed)
    # What reached the attention: one row, no mask, positions restarting at every sequence, and
    # the boundaries that the variable-length kernel then used in every layer.
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    restart = torch.cat([torch.arange(n) for n in lengths])
    assert len(seen) == 2 * 2  # 2 layers, 2 models
    for call in seen:
        assert call["batch"] == 1 and call["mask"] is None
        assert torch.equal(call["position_ids"], restart[None])
        assert call["cu_seq_lens_q"].tolist() == bounds
    assert kernels.calls == [("varlen", 1, bounds)] * 4
    torch.testing.assert_close(got_logprobs, want_logprobs * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_entropy, want_entropy * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_critic, want_critic, rtol=1e-5, atol=1e-5)


def test_rm_scores_with_a_flash_reward_model_and_an_sdpa_segmenter(torch_flash):
    """`score_pairs` (the RM trainer's micro-step) with `--packing`: the flash RM puts the batch in
    one row; the sdpa segmenter reads that row through the block mask. Same scores as padded."""
    kernels, _ = torch_flash
    sdpa_rm, flash_rm = _pair(AutoModelForTokenClassification, "llama", num_labels=1, classifier_dropout=0.0)
    segmenter, _ = _pair(AutoModelForCausalLM, "llama")
    prompts, chosen, _ = _sequences(6, seed=5)
    _, rejected, _ = _sequences(6, seed=6)
    pairs = [
        EncodedPair(p, c, True, r, i % 2 == 0)
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True))
    ]
    segmentation = Segmentation.resolve("segment", 2.0)
    cpu = torch.device("cpu")
    with torch.no_grad():
        want = score_pairs(sdpa_rm, segmenter, pairs, segmentation, PAD, cpu)
        kernels.calls.clear()
        got = score_pairs(flash_rm, segmenter, pairs, segmentation, PAD, cpu, packing=True)
    assert {kind for kind, *_ in kernels.calls} == {"varlen"}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# -- wired into the trainers: a checkpoint whose config selects flash attention ----------------------


def _with_torch_flash(folder: str, into: Path) -> str:
    """A copy of a model folder whose config.json selects TORCH_FLASH (as one can select
    flash_attention_2 there)."""
    import shutil

    shutil.copytree(folder, into)
    config = json.loads((into / "config.json").read_text())
    (into / "config.json").write_text(json.dumps({**config, "attn_implementation": TORCH_FLASH}))
    return str(into)


def test_rm_train_packing_under_flash_matches_padded(torch_flash, tiny_lm_dir, tmp_path):
    """`rm train --packing` on a flash checkpoint trains as the padded run does (before, rows of up
    to --max-len tokens mixed their sequences: every loss differed)."""
    from test_packing_training import _assert_same_run, _train_losses, ragged_rows
    from tiny import tiny_rm_config

    kernels, _ = torch_flash
    model = _with_torch_flash(tiny_lm_dir, tmp_path / "flash_lm")
    data = ragged_rows(tmp_path / "prefs.jsonl", n=48)
    padded = tiny_rm_config(model, data, tmp_path / "padded", max_steps=2, max_len=256)
    packed = dataclasses.replace(padded, output=str(tmp_path / "packed"), packing=True)
    losses_padded = _train_losses(padded)
    kernels.calls.clear()
    losses_packed = _train_losses(packed)
    assert kernels.calls and all(kind == "varlen" for kind, *_ in kernels.calls)
    _assert_same_run(padded, packed, losses_padded, losses_packed)


def test_ppo_update_packing_under_flash_matches_padded(torch_flash, tiny_lm_dir, tmp_path):
    """`ppo train --packing` with a flash policy (the critic, from the RM, runs sdpa): the same
    losses and weights as padding."""
    from test_packing_training import ragged_rows
    from test_ppo import ppo_config
    from tiny import tiny_rm_config

    from segppo.ppo.trainer import train_ppo
    from segppo.rm.trainer import train_reward_model
    from segppo.tracking import read_metrics

    rm = tiny_rm_config(
        tiny_lm_dir, ragged_rows(tmp_path / "prefs.jsonl", n=48), tmp_path / "rm", max_steps=2
    )
    train_reward_model(rm)
    prompts = tmp_path / "prompts.jsonl"
    lines = ["Name the capital.", "What is the capital of France, the country of cheese and wine?", "City?"]
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in lines * 20) + "\n")
    policy = _with_torch_flash(tiny_lm_dir, tmp_path / "flash_policy")
    padded = ppo_config(
        policy,
        str(rm.output_dir),
        str(prompts),
        tmp_path / "padded",
        max_new_tokens=12,
        max_prompt_len=64,
        critic_init="rm",
    )
    packed = dataclasses.replace(padded, output=str(tmp_path / "packed"), packing=True)
    _, seen = torch_flash
    train_ppo(padded)
    assert not any(c["cu_seq_lens_q"] is not None for c in seen)
    train_ppo(packed)
    assert any(c["batch"] == 1 and c["cu_seq_lens_q"] is not None for c in seen)  # the packed update
    want = read_metrics(padded.output_dir, split="train")
    got = read_metrics(packed.output_dir, split="train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for w, g in zip(want, got, strict=True):
        for key in ("reward", "kl", "response_length", "policy_loss", "value_loss", "approx_kl", "entropy"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (w["step"], key)


# -- on a GPU, with flash-attn -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_packed_and_padded_logprobs_agree_under_flash_attention_2():
    """The real kernel: packed (one row, varlen) and padded (unpadded by transformers) log-probs
    and entropy of the same bf16 model agree to bf16 precision; the rows the old code built
    (several sequences per row, no mask) do not."""
    from segppo.data.packing import pack_responses
    from segppo.kernels import entropy_logprobs

    torch.manual_seed(0)
    config = tiny_config("llama", hidden_size=128, num_attention_heads=4, intermediate_size=256)
    lm = AutoModelForCausalLM.from_config(
        config, attn_implementation="flash_attention_2", dtype=torch.bfloat16
    )
    lm = lm.cuda().eval()
    prompts, responses, has_eos = _sequences(12, seed=7)
    padded = collate_responses(prompts, responses, has_eos, PAD).to("cuda")
    mask = padded.response_mask
    with torch.no_grad():
        want, want_entropy = logprobs_and_entropy(
            lm, padded.input_ids, padded.attention_mask, padded.position_ids, padded.prompt_len
        )
        packed = pack_response_batch(padded, PAD, one_row=packs_in_one_row(lm)).to("cuda")
        got, got_entropy = packed_logprobs_and_entropy(lm, packed)
        # The old layout: rows of several sequences, position_ids and no mask.
        rows = pack_responses(prompts, responses, has_eos, PAD, max_tokens=32).to("cuda")
        logits = lm(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).logits
        _, old = entropy_logprobs(logits, torch.nn.functional.pad(rows.input_ids[:, 1:], (0, 1)))
        old = rows.gather(old, shift=-1)
    assert packed.input_ids.shape[0] == 1 and rows.input_ids.shape[0] >= 2
    torch.testing.assert_close(got, want * mask, rtol=0.05, atol=0.05)
    torch.testing.assert_close(got_entropy, want_entropy * mask, rtol=0.05, atol=0.05)
    assert (old - want * mask).abs().max() > 0.2  # the rows mixed their sequences (0.66 in float32 on CPU)
