"""Tied input/output embeddings (SmolLM2, Llama-3.2, Qwen2.5-0.5B, GPT-2): one weight with two uses
through ZeRO-3 loading and training, the LoRA merge and the exports, which must load with stock
transformers with the tie intact and equal the trained model. (The fused head on tied models:
tests/test_linear_entropy.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from segppo.distributed import launch
from tests.tiny import TIED_ARCHITECTURES, save_tiny_lm, tiny_config

IDS = torch.tensor([[5, 9, 30, 41, 7, 3, 12, 8], [40, 12, 8, 77, 3, 19, 200, 6]])


def _tied_lm(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def _is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _weight_names(folder) -> set[str]:
    with safe_open(Path(folder) / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_tied_export(folder, want_logits):
    """The folder loads with stock transformers, ties its embeddings, holds the weight once and
    gives `want_logits`."""
    assert json.loads((Path(folder) / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert _is_tied(loaded)
    head = [n for n in _weight_names(folder) if n.startswith(("lm_head.", "embed_out."))]
    assert not head, head  # one copy of the tied weight
    torch.testing.assert_close(_logits(loaded), want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", TIED_ARCHITECTURES)
def test_tied_variants_tie(arch, tmp_path):
    model = _tied_lm(arch)
    assert model.config.tie_word_embeddings and _is_tied(model)
    model.save_pretrained(tmp_path)
    _assert_tied_export(tmp_path, _logits(model))


# -- LoRA on a tied model --------------------------------------------------------------------------

peft = pytest.importorskip("peft")  # the `lora` extra (also in `dev`)
from segppo.models.lora import apply_lora, export_lora  # noqa: E402


def _as_if_trained(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("arch", TIED_ARCHITECTURES)
def test_lora_on_a_tied_model_exports_merged_with_the_tie_intact(arch, tmp_path):
    from segppo import segments

    lora = apply_lora(_tied_lm(arch), rank=4, alpha=8)  # every linear layer; the head stays plain
    _as_if_trained(lora)
    assert segments.plain_linear_head(lora) is not None  # the fused head still serves the actor
    trained = _logits(lora)
    assert not torch.allclose(trained, _logits(_tied_lm(arch)), atol=1e-3)
    export_lora(lora, tmp_path / "merged")
    _assert_tied_export(tmp_path / "merged", trained)


def test_an_adapter_on_a_tied_embedding_is_refused_before_training_unless_exported_alone(tmp_path):
    """The trained model would read W + ΔW at the input and W at the head; a tied export holds one
    weight, so the merged folder could not equal it: refused when the adapters are added."""
    with pytest.raises(ValueError, match="embed_tokens .*tied to lm_head.*--lora-export adapter") as err:
        apply_lora(_tied_lm("llama-tied"), rank=4, alpha=8, targets="embed_tokens,q_proj")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="tied to model.embed_tokens"):
        apply_lora(_tied_lm("llama-tied"), rank=4, alpha=8, targets="lm_head")
    # The adapter alone reloads onto the tied base as the trained model.
    lora = apply_lora(_tied_lm("llama-tied"), rank=4, alpha=8, targets="embed_tokens,q_proj", merge=False)
    _as_if_trained(lora)
    export_lora(lora, tmp_path / "adapter", merged=False)
    reloaded = peft.PeftModel.from_pretrained(_tied_lm("llama-tied"), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(lora), rtol=0, atol=0)


def test_ppo_train_with_lora_on_a_tied_policy_exports_it_tied(tiny_lm_dir, preferences_file, tmp_path):
    """`ppo train` of a tied policy under LoRA: the fused head, the adapter-free reference and the
    merged export, which equals the trained actor with its tie intact."""
    from segppo.ppo.trainer import train_ppo
    from segppo.rm.trainer import train_reward_model
    from tests.tiny import tiny_ppo_config, tiny_rm_config

    policy = save_tiny_lm(tmp_path / "policy", arch="llama-tied")
    train_reward_model(tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "rm", max_steps=2))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["Name the capital.", "Which city?"] * 16)
    )
    cfg = tiny_ppo_config(
        policy, (str(tmp_path / "rm"), str(prompts)), tmp_path / "run", lora_rank=4, lora_alpha=8.0
    )
    train_ppo(cfg)
    state = torch.load(
        cfg.output_dir / "state" / "step-2" / "actor" / "state" / "mp_rank_00_model_states.pt",
        weights_only=False,
    )["module"]
    actor = apply_lora(_tied_lm("llama-tied"), rank=4, alpha=8)
    actor.load_state_dict(state)
    assert _is_tied(actor.get_base_model())
    trained = _logits(actor.eval())
    assert not torch.allclose(trained, _logits(AutoModelForCausalLM.from_pretrained(policy)), atol=1e-4)
    _assert_tied_export(cfg.output_dir / "policy", trained)


# -- ZeRO-3 loading and training, 2 CPU ranks ------------------------------------------------------


def _train_tied_on_rank(folder: str, out: str) -> None:
    """On each rank: the tied checkpoint loaded whole under ZeRO-2 and partitioned under ZeRO-3
    (`load_policy`), one identical AdamW step on each, and each exported the way `ppo train` saves
    its actor (rank 0 writes the gathered state)."""
    from segppo.config import PPOConfig
    from segppo.distributed import full_state_dict, init_distributed, loading_config, shutdown
    from segppo.models import load_policy, save_policy
    from segppo.models.zero3 import is_partitioned, keep_partitioned_loading
    from segppo.optim import training_engine

    info = init_distributed()
    record = {}
    for stage in (2, 3):
        built = loading_config(zero_stage=stage, bf16=False)
        held = keep_partitioned_loading(built)  # noqa: F841  (transformers' weak reference)
        model = load_policy(folder, ds_config=built)
        tied = _is_tied(model)
        cfg = PPOConfig(
            policy=folder, reward_model="r", prompts="x", output="o", zero_stage=stage, warmup_ratio=0.0
        )
        engine, _ = training_engine(
            model, lr=1e-2, total_steps=1, micro_batch_size=2, grad_accum=1, config=cfg
        )
        before = _logits(engine)
        loss = engine(input_ids=IDS, labels=IDS).loss
        engine.backward(loss)
        engine.step()
        after = _logits(engine)
        state = full_state_dict(engine)
        if info.rank == 0:
            save_policy(engine.module, None, Path(out) / f"zero{stage}", state_dict=state)
        record[stage] = dict(
            tied=tied,
            partitioned=is_partitioned(engine.module),
            before=before,
            after=after,
            loss=loss.detach(),
        )
        del engine, model, held
    torch.save(record, Path(out) / f"rank{info.rank}.pt")
    shutdown()


@pytest.mark.slow  # one 2-rank launch: two engines per rank
def test_tied_model_under_zero3_loads_trains_and_exports_as_under_zero2(tmp_path):
    folder = save_tiny_lm(tmp_path / "tied", arch="llama-tied")
    assert "lm_head.weight" not in _weight_names(folder)  # the checkpoint holds the weight once
    out = tmp_path / "out"
    out.mkdir()
    launch(_train_tied_on_rank, folder, str(out), nproc=2, log_dir=out)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    for rank in range(2):
        record = torch.load(out / f"rank{rank}.pt", weights_only=True)
        zero2, zero3 = record[2], record[3]
        assert zero2["tied"] and zero3["tied"]  # built partitioned, the head is still the embedding
        assert zero3["partitioned"] and not zero2["partitioned"]
        for r in (zero2, zero3):
            torch.testing.assert_close(r["before"], _logits(plain), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zero3["loss"], zero2["loss"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(zero3["after"], zero2["after"], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(zero3["after"], zero3["before"], atol=1e-3)  # the step moved it
    for stage in (2, 3):
        _assert_tied_export(out / f"zero{stage}", record[stage]["after"])
