"""Saving checkpoints as Hugging Face folders (safetensors) with `segppo.json`, atomically."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from segppo.io import atomic_folder

from .metadata import METADATA_FILE, MetadataError, SegppoMetadata, segppo_version
from .reward_model import scalar_head


def save_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    metadata: SegppoMetadata,
    *,
    state_dict: dict | None = None,
    lora_export: str = "merged",
) -> Path:
    """Write a reward model folder loadable by plain `AutoModelForTokenClassification`.

    `state_dict` overrides the model's own tensors (a ZeRO-3 engine's gathered weights). A LoRA
    model is saved merged, or with `lora_export="adapter"` as its adapter and trained head alone.
    """
    if metadata.kind != "reward_model":
        raise MetadataError(
            f"field 'kind' must be 'reward_model' to save a reward model, got {metadata.kind!r}"
        )
    if not uses_lora(model):  # (a LoRA model's head is peft's wrapper around the trained copy)
        scalar_head(model)  # refuses anything but a one-label token-classification model
    return _save(model, tokenizer, out_dir, metadata, state_dict, lora_export)


def save_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    metadata: SegppoMetadata | None = None,
    *,
    state_dict: dict | None = None,
    lora_export: str = "merged",
) -> Path:
    """Write a policy folder loadable by plain `AutoModelForCausalLM` (a LoRA policy merged, or
    with `lora_export="adapter"` its adapter alone)."""
    metadata = metadata or SegppoMetadata(kind="policy")
    if metadata.kind != "policy":
        raise MetadataError(f"field 'kind' must be 'policy' to save a policy, got {metadata.kind!r}")
    return _save(model, tokenizer, out_dir, metadata, state_dict, lora_export)


def uses_lora(model) -> bool:
    """True for a peft model (or an engine around one); asked without importing peft."""
    model = getattr(model, "module", model)
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _save(
    model, tokenizer, out_dir, metadata: SegppoMetadata, state_dict: dict | None, lora_export: str
) -> Path:
    model = getattr(model, "module", model)  # a DDP/DeepSpeed wrapper's HF model
    # The version is the writer's, even when re-saving metadata read from an older folder.
    metadata = dataclasses.replace(metadata, segppo_version=segppo_version())
    template = getattr(tokenizer, "chat_template", None)
    if metadata.chat_template is None and isinstance(template, str):
        metadata = dataclasses.replace(metadata, chat_template=template)
    # Serialise first: bad metadata must fail before anything touches the disk.
    text = metadata.to_json()
    with atomic_folder(out_dir) as tmp:
        # transformers 5 always writes safetensors; the flag keeps 4.x from writing .bin.
        if uses_lora(model):
            from .lora import save_lora

            state = state_dict if state_dict is not None else model.state_dict()
            save_lora(model, state, tmp, merged=lora_export == "merged")
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if metadata.kind == "policy" and metadata.stop_token_ids:
            _record_stop_ids(tmp, metadata.stop_token_ids)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, metadata.chat_template)
        (tmp / METADATA_FILE).write_text(text, encoding="utf-8")
    return Path(out_dir)


def _save_tokenizer(tokenizer, folder: Path, chat_template: str | None) -> None:
    """Save `tokenizer` with the chat template the model was trained in (a base model's tokenizer
    has none, or another one, when the run was given `--chat-template`), so that plain transformers'
    `apply_chat_template` on the folder renders what the model saw. The caller's tokenizer is unchanged."""
    own = tokenizer.chat_template
    named = own.values() if isinstance(own, dict) else [own]
    if chat_template is not None and chat_template not in named:  # (named templates are kept whole)
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = own


def _record_stop_ids(folder: Path, stop_token_ids: list[int]) -> None:
    """Make the folder's `generation_config.json` end generation at the ids the policy's rollouts
    ended at: the tokenizer's EOS and the template's end of turn are stop ids too, which the base
    model's generation config may lack (a base model trained in ChatML), and plain `generate()`
    would write past them. A folder without one (a LoRA adapter alone) is left as it is."""
    if not (folder / "generation_config.json").is_file():
        return
    config = GenerationConfig.from_pretrained(folder)
    own = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if set(own) != set(stop_token_ids):
        config.eos_token_id = list(stop_token_ids)
        config.save_pretrained(folder)
