"""LoRA through `peft`, for the reward model, the actor and the critic.

- `apply_lora` wraps a model in low-rank adapters; for a reward model / critic (a one-label
  `*ForTokenClassification`) the per-token scalar head is not adapted but kept fully trainable and
  saved with the adapter (`modules_to_save`), its bias frozen at zero as in `reward_model.py`.
- `adapters_disabled` is the reference model under LoRA: the same weights with the adapters
  switched off, so PPO holds no second copy of the base.
- `export_lora` writes either merged weights (default; a stock transformers folder, no peft
  needed to load it) or the adapter alone (`adapter_config.json` + `adapter_model.safetensors`,
  loaded with `peft.PeftModel.from_pretrained(base, folder)`).

peft is an optional dependency (`pip install segppo[lora]`); importing this module without it fails
with a one-line message.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

from .reward_model import HEAD_NAMES

try:
    import peft
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("LoRA needs peft: pip install 'segppo[lora]' (or pip install peft)") from e

# Every linear layer of the transformer blocks (peft leaves out the LM head itself).
DEFAULT_TARGETS = "all-linear"


def _head_name(model: nn.Module) -> str | None:
    """The scalar head of a reward model / critic, None for a causal LM."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear) and head.out_features == 1:
            return name
    return None


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: str | Sequence[str] | None = None,
    *,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
) -> peft.PeftModel:
    """Wrap `model` in LoRA adapters of rank `rank` and scale `alpha/rank` on the `targets` modules
    (names or name suffixes, default every linear layer). Only the adapters (B initialised to 0,
    so the wrapped model starts equal to the base) and `modules_to_save` are trainable; by default
    `modules_to_save` is the scalar head when the model has one."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    if isinstance(model, peft.PeftModel):
        raise ValueError("the model already has LoRA adapters")
    head = _head_name(model)
    if modules_to_save is None:
        modules_to_save = [head] if head is not None else []
    if isinstance(targets, str) and targets != DEFAULT_TARGETS:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets if targets else DEFAULT_TARGETS,
        # The head is trained whole, never adapted, even when a target name would match it.
        exclude_modules=[head] if head is not None else None,
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"LoRA targets {targets!r}: {e}") from e
    if head is not None:
        # The trained copy of the head starts trainable everywhere; its bias stays the frozen zero.
        for name, param in wrapped.named_parameters():
            if "modules_to_save" in name and name.endswith(f"{head}.modules_to_save.default.bias"):
                param.requires_grad_(False)
    return wrapped


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model (adapters and the head's trained copy switched off) for the duration: the
    reference policy under LoRA. Works through a DeepSpeed engine wrapper."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, peft.PeftModel):
        raise ValueError(f"{type(inner).__name__} has no LoRA adapters to disable")
    with inner.disable_adapter():
        yield model


def export_lora(model: nn.Module, folder: str | os.PathLike, *, merged: bool = True) -> Path:
    """Save `model`'s weights to `folder`: merged into the base weights (a plain transformers
    model) or, with `merged=False`, the adapter (and trained head) alone. `model` is unchanged.

    Merging works on a copy, so it briefly needs a second copy of the weights in host memory;
    under ZeRO-3 the caller gathers the parameters first.
    """
    inner = getattr(model, "module", model)
    if not isinstance(inner, peft.PeftModel):
        raise ValueError(f"{type(inner).__name__} has no LoRA adapters to export")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if merged:
        plain = copy.deepcopy(inner).merge_and_unload()
        for param in plain.parameters():
            param.requires_grad_(True)  # requires_grad is not saved; keep the copy like a fresh load
        plain.save_pretrained(folder)
    else:
        inner.save_pretrained(folder)
    return folder
