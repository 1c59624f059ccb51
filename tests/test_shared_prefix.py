"""A batch's common prompt prefix run once (`segppo.models.shared_prefix`): the same outputs and
gradients as whole rows, taken only where it is exact and pays."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from segppo.models import shared_prefix
from segppo.models.lora import apply_lora
from segppo.models.reward_model import reward_values
from segppo.models.shared_prefix import can_share_prefix, forward_logits, prefix_to_share
from segppo.segments import logprobs_and_entropy, reference_logprobs_and_entropy

PREFIX = [1, 5, 9, 17, 23, 40, 41, 42, 43, 44, 45, 46, 47, 48]  # 14 tokens every prompt opens with


def layout(tails, responses, pad=0):
    """Left-padded prompts `PREFIX + tail`, right-padded responses: segppo's batch layout."""
    prompts = [PREFIX + t for t in tails]
    P, T = max(map(len, prompts)), max(map(len, responses))
    ids = torch.tensor(
        [[pad] * (P - len(p)) + p + r + [pad] * (T - len(r)) for p, r in zip(prompts, responses, strict=True)]
    )
    mask = torch.tensor(
        [
            [0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (T - len(r))
            for p, r in zip(prompts, responses, strict=True)
        ]
    )
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), P


TAILS = [[60, 61, 62], [70], [80, 81], [90, 91, 92]]
RESPONSES = [[100, 101, 102, 103, 104], [110, 111], [120, 121, 122, 123, 124], [130]]


class Calls:
    """Counts a model's forward calls (the real forward runs)."""

    def __init__(self, model):
        self.count = 0
        model.register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        self.count += 1


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _whole_and_shared(model, run, monkeypatch):
    """`run()` (forward + loss) with sharing off, then on; outputs and gradients of both."""
    calls = Calls(model)
    results = []
    for minimum in (2.0, shared_prefix.MIN_SHARED_COLUMNS):  # 2.0: never pays, whole rows
        monkeypatch.setattr(shared_prefix, "MIN_SHARED_COLUMNS", minimum)
        model.zero_grad(set_to_none=True)
        calls.count = 0
        out = run()
        out.float().pow(2).sum().backward()
        results.append((out.detach(), _grads(model), calls.count))
    return results


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama-tied", "smollm3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_lm_logprobs_and_gradients_equal_whole_rows(arch, attn, monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn).train()
    ids, mask, positions, P = layout(TAILS, RESPONSES)

    def run():
        logprobs, entropy = logprobs_and_entropy(model, ids, mask, positions, P)
        return torch.cat([logprobs, entropy], 1)

    (whole, whole_grads, whole_calls), (shared, shared_grads, shared_calls) = _whole_and_shared(
        model, run, monkeypatch
    )
    assert (whole_calls, shared_calls) == (1, 2)  # the prefix's pass and the rest's
    torch.testing.assert_close(shared, whole, atol=2e-5, rtol=1e-5)
    assert len(shared_grads) == len(whole_grads)
    for a, b in zip(shared_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_scalar_head_values_equal_whole_rows_at_every_column(arch, monkeypatch):
    """The reward model's and critic's values come back at every column, the prefix's included."""
    torch.manual_seed(0)
    config = tiny_config(arch, num_labels=1, classifier_dropout=0.0)  # segppo's scalar heads: no dropout
    model = AutoModelForTokenClassification.from_config(config).train()
    ids, mask, positions, _ = layout(TAILS, RESPONSES)
    (whole, whole_grads, _), (shared, shared_grads, calls) = _whole_and_shared(
        model, lambda: reward_values(model, ids, mask, positions), monkeypatch
    )
    assert calls == 2
    assert shared.shape == whole.shape == ids.shape
    torch.testing.assert_close(shared, whole, atol=2e-5, rtol=1e-5)
    for a, b in zip(shared_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_reference_scoring_under_no_grad_and_a_lora_wrapper(monkeypatch):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model = apply_lora(base, rank=4, alpha=8)
    for name, p in model.named_parameters():  # adapters away from 0, so they change the outputs
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask, positions, P = layout(TAILS, RESPONSES)
    outputs = []
    for minimum in (2.0, shared_prefix.MIN_SHARED_COLUMNS):
        monkeypatch.setattr(shared_prefix, "MIN_SHARED_COLUMNS", minimum)
        outputs.append(torch.cat(reference_logprobs_and_entropy(model, ids, mask, positions, P), 1))
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-5, rtol=1e-5)


def test_the_prefix_stops_before_each_rows_last_prompt_token_and_the_kept_columns():
    # Two rows whose prompts are the prefix alone: each keeps its prompt's last token.
    ids, mask, positions, P = layout([[], [], [7], [7]], [[5, 6], [5], [5, 6], [6]])
    keep = ids.shape[1] - P + 1
    starts, prefix = prefix_to_share(ids, mask, positions, keep)
    assert prefix.tolist() == PREFIX[:-1]
    assert starts.tolist() == [1, 1, 0, 0]
    # Without `keep` (every column read back) only a real token must be left in each row.
    assert prefix_to_share(ids, mask, positions, None)[1].tolist() == PREFIX


def test_no_sharing_where_it_does_not_pay_or_rows_differ():
    ids, mask, positions, P = layout(TAILS, RESPONSES)
    assert prefix_to_share(ids[:1], mask[:1], positions[:1], None) is None  # one row
    different = ids.clone()
    different[1, mask[1].argmax() + 3] = 300  # row 1 leaves the prefix after 3 tokens
    assert prefix_to_share(different, mask, positions, None) is None
    shifted = positions.clone()
    shifted[2] += mask[2]  # positions from 1: not the prefix's 0..c-1
    assert prefix_to_share(ids, mask, shifted, None) is None
    long_tails = [t + list(range(200, 260)) for t in TAILS]  # the prefix is a small part of each row
    ids, mask, positions, P = layout(long_tails, RESPONSES)
    assert prefix_to_share(ids, mask, positions, None) is None


def test_models_that_run_whole_rows(monkeypatch):
    width = 40
    assert can_share_prefix(AutoModelForCausalLM.from_config(tiny_config("llama")), width)
    assert not can_share_prefix(AutoModelForCausalLM.from_config(tiny_config("gpt2")), width)
    checkpointed = AutoModelForCausalLM.from_config(tiny_config("llama"))
    checkpointed.gradient_checkpointing_enable()
    assert not can_share_prefix(checkpointed, width)  # transformers drops a passed cache there
    windowed = AutoModelForCausalLM.from_config(tiny_config("mistral", sliding_window=16))
    assert not can_share_prefix(windowed, width)
    assert can_share_prefix(windowed, 16)
    flash = AutoModelForCausalLM.from_config(tiny_config("llama"))
    flash.config._attn_implementation = "flash_attention_2"
    assert not can_share_prefix(flash, width)
    # A model that runs whole rows is called once, whatever its rows share.
    ids, mask, positions, _ = layout(TAILS, RESPONSES)
    calls = Calls(checkpointed)
    forward_logits(checkpointed, dict(input_ids=ids, attention_mask=mask, position_ids=positions))
    assert calls.count == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generation_prefills_the_common_prefix_once_and_draws_the_same(arch, monkeypatch):
    """Seeded sampling draws from the logits alone, so the same responses come back with the
    prefix prefilled once; the prompts' forward in generate then runs only each row's rest."""
    from segppo.generation import SamplingConfig, generate_seeded

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    prompts = [PREFIX + t for t in TAILS]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    widths = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    batches = []
    for minimum in (2.0, shared_prefix.MIN_SHARED_COLUMNS):
        monkeypatch.setattr(shared_prefix, "MIN_SHARED_COLUMNS", minimum)
        widths.clear()
        batches.append(
            generate_seeded(model, prompts, sampling, [11, 12, 13, 14], pad_token_id=0, device="cpu")
        )
        if minimum == 2.0:
            assert widths[0] == (4, len(PREFIX) + 3)  # whole prompts
        else:
            assert widths[:2] == [(1, len(PREFIX)), (4, 3)]  # the prefix once, then the rest
    whole, shared = batches
    assert torch.equal(shared.input_ids, whole.input_ids)
    assert torch.equal(shared.attention_mask, whole.attention_mask)
    assert torch.equal(shared.response_mask, whole.response_mask)
