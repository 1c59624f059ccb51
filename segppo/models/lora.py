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
import inspect
import os
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from segppo.io import as_recorded, atomic_folder

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
    merge: bool = True,
) -> peft.PeftModel:
    """Wrap `model` in LoRA adapters of rank `rank` and scale `alpha/rank` on the `targets` modules
    (names or name suffixes, default every linear layer). Only the adapters (B initialised to 0,
    so the wrapped model starts equal to the base) and `modules_to_save` are trainable; by default
    `modules_to_save` is the scalar head when the model has one. With `merge` (a merged export
    will follow) an adapter that cannot be merged is refused here, before any training
    (`check_mergeable`)."""
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
        # The adapters take their layer's dtype: the bf16 of a base built under ZeRO-3 (float32
        # adapters beside it break DeepSpeed's one-dtype partitions); elsewhere the engine casts
        # the whole model to its dtype anyway, and ZeRO keeps float32 master weights.
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:
        raise ValueError(f"LoRA targets {targets!r}: {e}") from e
    if head is not None:
        # The trained copy of the head starts trainable everywhere; its bias stays the frozen zero.
        for name, param in wrapped.named_parameters():
            if "modules_to_save" in name and name.endswith(f"{head}.modules_to_save.default.bias"):
                param.requires_grad_(False)
    if merge:
        check_mergeable(wrapped)
    _expose_base_signature(wrapped)
    return wrapped


class _LoraModel(peft.PeftModel):
    """peft's `PeftModel`, seen from outside as its base model where segppo looks at the model.

    `generate` reaches the base model (peft forwards unknown attributes), so its generation config
    must be the base model's too: `HFEngine` swaps it for one call, and a copy set on the wrapper
    would be ignored by `generate`."""

    @property
    def generation_config(self):
        return self.get_base_model().generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.get_base_model().generation_config = value


def _expose_base_signature(wrapped: peft.PeftModel) -> None:
    """peft's forward is `(*args, **kwargs)`; callers that ask a forward whether it takes
    `position_ids` or `logits_to_keep` (`reward_values`, `segments.last_logits`) would then drop
    them, and a left-padded row would be read at the wrong positions. The wrapper's forward gets
    the base model's signature (it passes every keyword through to the base model anyway)."""
    wrapped.__class__ = _LoraModel
    base = inspect.signature(wrapped.get_base_model().forward)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args, **kwargs):
        return peft.PeftModel.forward(self, *args, **kwargs)

    forward.__signature__ = base.replace(parameters=[self_param, *base.parameters.values()])
    wrapped.forward = types.MethodType(forward, wrapped)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model (adapters and the head's trained copy switched off) for the duration: the
    reference policy under LoRA. Works through a DeepSpeed engine wrapper."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, peft.PeftModel):
        raise ValueError(f"{type(inner).__name__} has no LoRA adapters to disable")
    with inner.disable_adapter():
        yield model


class AdapterFreeView:
    """The reference policy under LoRA: the actor's own engine, called with its adapters off, so
    no second copy of the base model is loaded. Stands where a frozen model would (`module`
    is the model, for callers that look at its forward or output embeddings)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.module = getattr(engine, "module", engine)

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.engine):
            return self.engine(*args, **kwargs)


def _adapted_layers(inner: peft.PeftModel) -> dict[str, peft.tuners.lora.LoraLayer]:
    """Every LoRA layer of `inner` by its (peft) module name."""
    return {
        name: module
        for name, module in inner.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
        and ("default" in module.lora_A or "default" in module.lora_embedding_A)
    }


def _plain_name(name: str) -> str:
    """A peft module or parameter name as the base model calls it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def check_mergeable(model: nn.Module) -> None:
    """A one-line error naming the first adapter `merged_state_dict` cannot fold into the base
    weights: anything but plain LoRA on a linear layer or an embedding, and an adapter on a weight
    that another module shares (tied embeddings). The tied head keeps using the unadapted weight
    while the trained model runs, and a tied export holds one copy of it, so no merged folder can
    equal the trained model. (peft's `ensure_weight_tying` ties the two adapters as two parameters
    over one storage, which DeepSpeed's flat buffers split and AdamW would step twice.)"""
    inner = getattr(model, "module", model)
    users: dict[int, list[str]] = {}
    for name, param in inner.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(name)
    for name, layer in _adapted_layers(inner).items():
        where = f"LoRA on {_plain_name(name)}"
        embedding = "default" in layer.lora_embedding_A
        if not embedding and not isinstance(layer.lora_A["default"], nn.Linear):
            raise ValueError(f"{where}: only plain LoRA on linear layers and embeddings can be merged")
        if layer.use_dora.get("default") or layer.lora_bias.get("default"):
            raise ValueError(f"{where}: DoRA and LoRA biases cannot be merged")
        weight = layer.get_base_layer().weight
        shared = [n for n in users[id(weight)] if n != f"{name}.base_layer.weight"]
        if shared:
            raise ValueError(
                f"{where} cannot be merged: its weight is tied to {_plain_name(shared[0])}, which would "
                f"keep the unadapted weight; leave {name.rsplit('.', 1)[-1]} out of --lora-targets, or "
                "export the adapter alone (--lora-export adapter)"
            )


def _delta(layer, module_name: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """`scaling · B·A` of one adapter in the layout of the base weight (peft's `get_delta_weight`):
    `[out, in]` for a linear layer (transposed for GPT-2's Conv1D, `fan_in_fan_out`), and for an
    embedding, whose adapter maps ids through `A [r, V]` then `B [H, r]`, the `[V, H]` of its weight."""
    if "default" in layer.lora_embedding_A:
        a = state[f"{module_name}.lora_embedding_A.default"].float()
        b = state[f"{module_name}.lora_embedding_B.default"].float()
        return (b @ a).T * layer.scaling["default"]
    a = state[f"{module_name}.lora_A.default.weight"].float()
    b = state[f"{module_name}.lora_B.default.weight"].float()
    delta = b @ a
    return (delta.T if layer.fan_in_fan_out else delta) * layer.scaling["default"]


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of LoRA `model` from its full (peft-named) `state`: each
    adapted weight (linear layers and embeddings) is `W + scaling · B·A` (peft's own merge), each
    trained copy of a head replaces the head, and the names are the base model's. Works on a
    gathered state dict, so under ZeRO-3 no rank needs the model's parameters whole, only rank 0
    this one state dict."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, peft.PeftModel):
        raise ValueError(f"{type(inner).__name__} has no LoRA adapters to merge")
    check_mergeable(inner)
    layers = _adapted_layers(inner)
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue  # the adapters are merged below; a head's frozen original is replaced
        module_name = key.rsplit(".", 1)[0].removesuffix(".base_layer")
        if key.endswith(".base_layer.weight") and module_name in layers:
            value = (value.float() + _delta(layers[module_name], module_name, state)).to(value.dtype)
        plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        merged[plain.replace(".modules_to_save.default.", ".")] = value
    return merged


def export_lora(model: nn.Module, folder: str | os.PathLike, *, merged: bool = True) -> Path:
    """Save `model`'s weights to `folder`: merged into the base weights (a plain transformers
    model) or, with `merged=False`, the adapter (and trained head) alone. `model` is unchanged.
    The folder is written atomically and replaces an earlier one whole: no weights of an earlier
    export stay beside the new ones."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, peft.PeftModel):
        raise ValueError(f"{type(inner).__name__} has no LoRA adapters to export")
    state = {k: v.detach() for k, v in inner.state_dict().items()}
    with atomic_folder(folder) as tmp:
        save_lora(inner, state, tmp, merged=merged)
    return Path(folder)


def save_lora(model: nn.Module, state: dict[str, torch.Tensor], folder: Path, *, merged: bool) -> None:
    """Write the full peft-named `state` of LoRA `model` into `folder` (which exists): merged
    weights as a stock transformers folder, or peft's adapter files (adapters and trained head)."""
    inner = getattr(model, "module", model)
    if merged:
        # requires_grad is not saved; the folder loads like any other transformers model.
        inner.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(inner, state))
    else:
        # peft records the base as it was given; a relative path would name it only from the run's
        # working directory (AutoPeftModelForCausalLM loads the base from this record).
        config = inner.peft_config["default"]
        if config.base_model_name_or_path:
            config.base_model_name_or_path = as_recorded(config.base_model_name_or_path)
        inner.save_pretrained(folder, state_dict=state)
