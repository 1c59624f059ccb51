"""LoRA through peft: starts equal to the base, trains only adapters and the head, exports load
with stock transformers, and the adapter-disabled model is the untouched base (the reference)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from segppo.models.reward_model import init_scalar_head, reward_values, scalar_head
from tests.tiny import tiny_config

peft = pytest.importorskip("peft")  # the `lora` extra (also in `dev`)
from segppo.models.lora import adapters_disabled, apply_lora, export_lora  # noqa: E402

IDS = torch.tensor([[5, 9, 30, 41, 7, 3], [0, 0, 12, 8, 77, 3]])
MASK = (IDS != 0).long()


def _reward_model(arch="llama"):
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(
        tiny_config(arch, num_labels=1, classifier_dropout=0.0)
    )
    init_scalar_head(model)
    return model.eval()


def _lm(arch="llama"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def _values(model):
    with torch.no_grad():
        return reward_values(model, IDS, MASK)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _train(model, steps=3):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(steps):
        values = reward_values(model, IDS, MASK)
        loss = -torch.nn.functional.logsigmoid(values[0].sum() - values[1].sum())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_lora_rm_starts_equal_and_trains_only_adapters_and_head(arch):
    model = _reward_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_values = _values(model)
    lora = apply_lora(model, rank=4, alpha=8)
    torch.testing.assert_close(_values(lora), base_values, rtol=0, atol=0)

    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    head = next(n for n in ("score", "classifier") if getattr(model, n, None) is not None)
    assert f"base_model.model.{head}.modules_to_save.default.weight" in trainable
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert not any(n.endswith("bias") for n in trainable)  # the head's bias stays the frozen zero

    _train(lora)
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, _initial(lora, n, before))}
    assert changed and changed <= trainable
    assert any(n.endswith(f"{head}.modules_to_save.default.weight") for n in changed)
    assert any("lora_B" in n for n in changed)
    assert not torch.equal(_values(lora), base_values)
    with adapters_disabled(lora):  # the reference: the original weights, head included
        torch.testing.assert_close(_values(lora), base_values, rtol=0, atol=0)


def _initial(lora, name, before):
    """The parameter's value before LoRA; for the adapters, which did not exist then, NaN (so they
    always count as changed, and the check is that every frozen base weight is unchanged)."""
    plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
    plain = plain.replace(".modules_to_save.default", "").replace(".original_module", "")
    if plain in before:
        return before[plain]
    return torch.full_like(dict(lora.named_parameters())[name], float("nan"))


def test_merged_export_loads_with_stock_transformers(tmp_path):
    rm = apply_lora(_reward_model(), rank=4, alpha=16)
    _train(rm)
    export_lora(rm, tmp_path / "rm")
    assert not (tmp_path / "rm" / "adapter_config.json").exists()
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "rm").eval()
    torch.testing.assert_close(_values(loaded), _values(rm), rtol=1e-5, atol=1e-6)
    assert isinstance(scalar_head(loaded), torch.nn.Linear)
    assert isinstance(rm, peft.PeftModel)  # export left the training model wrapped

    lm = apply_lora(_lm(), rank=4, alpha=8, targets="q_proj,v_proj")
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # as if trained
    export_lora(lm, tmp_path / "lm")
    loaded_lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    torch.testing.assert_close(_logits(loaded_lm), _logits(lm), rtol=1e-5, atol=1e-5)
    with adapters_disabled(lm):
        torch.testing.assert_close(_logits(lm), _logits(_lm()), rtol=0, atol=0)


def test_adapter_only_export_reloads_onto_the_base(tmp_path):
    rm = apply_lora(_reward_model(), rank=2, alpha=4)
    _train(rm)
    export_lora(rm, tmp_path / "adapter", merged=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = peft.PeftModel.from_pretrained(_reward_model(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_values(reloaded), _values(rm), rtol=0, atol=0)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_lm(), rank=0, alpha=8)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(_lm(), rank=4, alpha=0)
    with pytest.raises(ValueError, match="targets"):
        apply_lora(_lm(), rank=4, alpha=8, targets="no_such_proj")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with adapters_disabled(_lm()):
            pass
