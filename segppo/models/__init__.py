"""Backbones, the per-token scalar reward head, and save/load with segppo.json."""

from .loading import (
    disable_dropout,
    enable_gradient_checkpointing,
    load_policy,
    load_tokenizer,
    resolve_dtype,
)
from .metadata import METADATA_FILE, MetadataError, SegppoMetadata
from .reward_model import (
    create_reward_model,
    freeze_head_bias,
    init_scalar_head,
    load_reward_model,
    reward_values,
    scalar_head,
)
from .saving import save_policy, save_reward_model

__all__ = [
    "METADATA_FILE",
    "MetadataError",
    "SegppoMetadata",
    "create_reward_model",
    "disable_dropout",
    "enable_gradient_checkpointing",
    "freeze_head_bias",
    "init_scalar_head",
    "load_policy",
    "load_reward_model",
    "load_tokenizer",
    "resolve_dtype",
    "reward_values",
    "save_policy",
    "save_reward_model",
    "scalar_head",
]
