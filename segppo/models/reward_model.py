"""The per-token scalar reward model: a stock `*ForTokenClassification` with one label.

Using transformers' own class (rather than a custom value-head module) is what lets any
transformers install load a segppo reward model without `trust_remote_code`. The head is the
class's own linear layer: `score` for Llama, Qwen2, Mistral and Phi-3, `classifier` for GPT-2 and
GPT-NeoX. Those layers have a bias; segppo zeroes it and freezes it, so the head is effectively
bias-free (a constant offset cancels in the Bradley-Terry loss anyway, and a frozen zero keeps the
saved folder loadable by every transformers version). Dropout before the head is switched off.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForTokenClassification, PreTrainedModel

from .loading import (
    PICKLE_FILES,
    SAFETENSORS_FILES,
    check_not_adapter_only,
    enable_gradient_checkpointing,
    local_model_folder,
    pretrained_kwargs,
    resolve_dtype,
)
from .metadata import METADATA_FILE, MetadataError, SegppoMetadata
from .shared_prefix import forward_logits
from .zero3 import gathered_for_edit, is_zero3

HEAD_NAMES = ("score", "classifier")
# Where other code bases put a scalar head: OpenRLHF and the paper's fork (`value_head_prefix`,
# default "score"), older OpenRLHF ("value_head"), and every *ForSequenceClassification ("score").
IMPORT_HEAD_NAMES = ("score", "value_head", "classifier")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_WEIGHT_FILES = SAFETENSORS_FILES + PICKLE_FILES  # in order of preference


def scalar_head(model: nn.Module) -> nn.Linear:
    """The linear layer that maps a hidden state to the per-token reward."""
    model = getattr(model, "module", model)
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            if head.out_features != 1:
                raise ValueError(
                    f"{type(model).__name__}.{name} has {head.out_features} outputs; a reward model needs 1"
                )
            return head
    raise ValueError(f"{type(model).__name__} has no scalar head (looked for {HEAD_NAMES})")


def _head_name(model: nn.Module) -> str:
    head = scalar_head(model)
    return next(name for name in HEAD_NAMES if getattr(model, name, None) is head)


def init_scalar_head(model: nn.Module, std: float | None = None) -> None:
    """Weights ~ N(0, 1/(H+1)) (std 1/sqrt(H+1), Stiennon et al. 2020), bias zero and frozen."""
    head = scalar_head(model)
    if std is None:
        std = 1.0 / math.sqrt(head.in_features + 1)
    with torch.no_grad():
        head.weight.normal_(mean=0.0, std=std)
        if head.bias is not None:
            head.bias.zero_()
    freeze_head_bias(model)


def freeze_head_bias(model: nn.Module) -> None:
    # requires_grad is not saved with the weights, so every loader calls this again.
    head = scalar_head(model)
    if head.bias is not None:
        head.bias.requires_grad_(False)


def _reward_config(name_or_path, trust_remote_code: bool):
    return _as_reward_config(AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code))


def _as_reward_config(config):
    config.num_labels = 1
    # Every token-classification class reads `classifier_dropout` first (GPT-2 and GPT-NeoX would
    # otherwise default to 0.1); a noisy reward head only adds variance to the Bradley-Terry loss.
    config.classifier_dropout = 0.0
    config.use_cache = False
    return config


def _from_pretrained(folder, config, dtype, trust_remote_code, *, expected_missing=(), ds_config=None):
    """Load the token-classification model, failing if any backbone weight was not in the checkpoint.
    With a ZeRO-3 `ds_config` it is built partitioned (`segppo.models.zero3`)."""
    if is_zero3(ds_config):
        from .zero3 import from_pretrained_partitioned

        return from_pretrained_partitioned(
            AutoModelForTokenClassification,
            local_model_folder(folder),
            ds_config,
            config=config,
            dtype=resolve_dtype(dtype),
            missing_ok=tuple(expected_missing),
            trust_remote_code=trust_remote_code,
        )
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            folder,
            config=config,
            output_loading_info=True,
            **pretrained_kwargs(folder, dtype, trust_remote_code),
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(
                f"{folder}: transformers has no *ForTokenClassification class for model_type "
                f"{config.model_type!r}, which a segppo reward model needs (README: Model families checked)"
            ) from e
        raise
    missing = set(info.get("missing_keys", ())) - set(expected_missing)
    mismatched = info.get("mismatched_keys", ())
    if missing or mismatched:
        raise ValueError(
            f"{folder}: the checkpoint does not match {type(model).__name__}: "
            f"missing {sorted(missing)[:8]}, mismatched {list(mismatched)[:8]}"
        )
    return model


def create_reward_model(
    base_name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    head_std: float | None = None,
    ds_config: dict | None = None,
) -> PreTrainedModel:
    """A new reward model: the causal LM's backbone weights plus a freshly initialised scalar head.

    `head_std` defaults to 1/sqrt(H+1). (The paper's code draws with std 1/(H+1), i.e. a head
    sqrt(H+1) times smaller; pass that to reproduce it exactly.) With a ZeRO-3 `ds_config` the
    model is built partitioned, and its head drawn exactly as in a plain load.
    """
    config = _reward_config(base_name_or_path, trust_remote_code)
    head_keys = [f"{name}.{p}" for name in HEAD_NAMES for p in ("weight", "bias")]
    model = _from_pretrained(
        base_name_or_path, config, dtype, trust_remote_code, expected_missing=head_keys, ds_config=ds_config
    )
    with gathered_for_edit(scalar_head(model).parameters()), torch.no_grad():
        if is_zero3(ds_config):
            # A plain load draws the missing head once (transformers' init, N(0, initializer_range))
            # before `init_scalar_head` draws it again; the same draw keeps the two loads' RNG equal.
            scalar_head(model).weight.normal_(0.0, config.initializer_range)
        init_scalar_head(model, head_std)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def reward_values(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token scalar rewards, `[B, S]` float32, 0 at padding; differentiable.

    Without `position_ids`, positions count real tokens only (`cumsum(mask) - 1`), so a
    left-padded row scores exactly as it would unpadded; they are passed only to models whose
    forward takes them.
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    # A peft model's own forward is (*args, **kwargs); the base model's says what it takes.
    forward = module.get_base_model().forward if hasattr(module, "get_base_model") else module.forward
    if "position_ids" in inspect.signature(forward).parameters:
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = position_ids
    values = forward_logits(model, kwargs)[..., 0].float()
    return values.masked_fill(attention_mask == 0, 0.0)


def load_reward_model(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    granularity: str | None = None,
    threshold: float | None = None,
    gradient_checkpointing: bool = False,
    ds_config: dict | None = None,
) -> tuple[PreTrainedModel, SegppoMetadata]:
    """Load a reward model as a one-label `*ForTokenClassification`, with its metadata.

    Accepted layouts:
    - a segppo folder (`segppo.json` beside the weights);
    - a `*ForTokenClassification` folder without `segppo.json`;
    - the paper's (OpenRLHF's) layout: backbone weights plus a bias-free `score` (or
      `config.value_head_prefix`) linear layer, with `mean`/`std` in config.json, which become
      `score_mean`/`score_std`;
    - a `*ForSequenceClassification` with one label, read as a bandit RM: its head is copied into
      the token-classification head, so the value at the last token is the sequence score.

    `granularity`/`threshold` override what the folder records; layouts that do not record a
    granularity (the paper's, plain token classification) require `granularity`. With a ZeRO-3
    `ds_config` the model is built partitioned.
    """
    folder = _local_folder(path, trust_remote_code)
    weights = _weight_index(folder)
    has_config = (folder / "config.json").is_file()
    check_not_adapter_only(folder, "the reward model")
    if not has_config and not weights:
        raise FileNotFoundError(f"{folder}: neither config.json nor model weights; not a model folder")
    if not has_config:
        raise FileNotFoundError(f"{folder}: config.json is missing")
    if not weights:
        raise FileNotFoundError(f"{folder}: no model weights ({', '.join(_WEIGHT_FILES)})")

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    head_key = None  # None: the checkpoint holds the token-classification head under its own name
    if (folder / METADATA_FILE).is_file():
        metadata = SegppoMetadata.load(folder / METADATA_FILE)
        if metadata.kind != "reward_model":
            raise MetadataError(
                f"{folder / METADATA_FILE}: field 'kind' is {metadata.kind!r}, not 'reward_model'"
            )
    elif any(a.endswith("ForTokenClassification") for a in architectures):
        metadata = _imported("token_classification", folder)
    elif any(a.endswith("ForSequenceClassification") for a in architectures):
        head_key = _find_head_key(folder, config, weights)
        metadata = _imported("sequence_classification", folder, granularity="bandit")
    else:
        head_key = _find_head_key(folder, config, weights)
        metadata = _imported(
            "paper",
            folder,
            score_mean=_float_or_none(getattr(config, "mean", None)),
            score_std=_float_or_none(getattr(config, "std", None)),
        )
    if head_key is None:
        num_labels = config.num_labels
    else:
        head_weight = _read_tensor(weights[f"{head_key}.weight"], f"{head_key}.weight")
        num_labels = head_weight.shape[0] if head_weight.dim() == 2 else -1
    if num_labels != 1:
        raise ValueError(f"{folder}: the head has {num_labels} labels; a reward model needs exactly 1")

    if granularity is not None:
        metadata = dataclasses.replace(metadata, granularity=granularity)
    if threshold is not None:
        metadata = dataclasses.replace(metadata, threshold=threshold)
    if metadata.granularity is None:
        raise ValueError(
            f"{folder} does not record the reward model's granularity; pass granularity='segment' "
            "(with threshold=...), 'token' or 'bandit'"
        )
    try:
        metadata.validate()
    except MetadataError as e:
        raise MetadataError(f"{folder}: {e}") from e

    config = _as_reward_config(config)
    if head_key is None:
        model = _from_pretrained(folder, config, dtype, trust_remote_code, ds_config=ds_config)
    else:
        # The source head is either absent from the class or under the same name (then loaded).
        own = [f"{name}.{p}" for name in HEAD_NAMES for p in ("weight", "bias")]
        model = _from_pretrained(
            folder, config, dtype, trust_remote_code, expected_missing=own, ds_config=ds_config
        )
        bias_key = f"{head_key}.bias"
        head_bias = _read_tensor(weights[bias_key], bias_key) if bias_key in weights else None
        with gathered_for_edit(scalar_head(model).parameters()):
            _copy_head(model, head_weight, head_bias)
    freeze_head_bias(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, metadata


def run_model_folder(path: Path) -> Path:
    """A training run's output folder stands for its final model (`run/model`)."""
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def _local_folder(name_or_path, trust_remote_code: bool) -> Path:
    """A local folder holding the checkpoint: the path itself, or a hub snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return run_model_folder(path)
    text = str(name_or_path)
    if path.exists() or path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{name_or_path}: no such folder")
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        folder = Path(snapshot_download(text, allow_patterns=patterns))
        if not any((folder / name).is_file() for name in SAFETENSORS_FILES):
            folder = Path(snapshot_download(text, allow_patterns=patterns + ["*.bin"]))
    except Exception as e:  # the hub client raises many types; the cause is kept
        raise FileNotFoundError(
            f"{name_or_path}: not a local folder, and fetching it from the hub failed: {e}"
        ) from e
    return folder


def _weight_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, for the checkpoint in `folder` (empty if none)."""
    for name in _WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(file.read_text())["weight_map"]
            return {key: folder / shard for key, shard in weight_map.items()}
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                return dict.fromkeys(f.keys(), file)
        return dict.fromkeys(_load_pickle(file), file)
    return {}


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)
    return _load_pickle(file)[key]


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    # weights_only refuses anything but tensors, so a .bin cannot run code when unpickled.
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _find_head_key(folder: Path, config, weights: dict[str, Path]) -> str:
    names = [name for name in (getattr(config, "value_head_prefix", None), *IMPORT_HEAD_NAMES) if name]
    for name in names:
        if f"{name}.weight" in weights:
            return name
    raise ValueError(
        f"{folder}: no scalar head found (looked for {', '.join(f'{n}.weight' for n in names)}); "
        "to start a reward model from a causal LM, use create_reward_model"
    )


def _copy_head(model: PreTrainedModel, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    head = scalar_head(model)
    with torch.no_grad():
        head.weight.copy_(weight.reshape(head.weight.shape))
        if head.bias is not None and bias is not None:
            head.bias.copy_(bias.reshape(head.bias.shape))
        elif head.bias is not None:
            head.bias.zero_()


def _imported(layout: str, folder: Path, **fields) -> SegppoMetadata:
    # Provenance lands in `extra`, so it is written to segppo.json when the model is saved again.
    return SegppoMetadata(
        kind="reward_model", extra={"imported_from": {"layout": layout, "path": str(folder)}}, **fields
    )


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)
