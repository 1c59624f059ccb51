"""One dataclass per command, and presets that reproduce the paper's runs.

Field names are the CLI option names with `-` for `_`, so a YAML `--config` file, a preset and the
flags all speak the same keys. Trainers take these objects, never parsed CLI arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segppo.kernels import GRANULARITIES


@dataclass
class RMConfig:
    """`segppo rm train`: a segment-, token- or bandit-level reward model from preference pairs."""

    model: str
    dataset: str
    output: str
    granularity: str = "segment"
    entropy_threshold: float = 2.0
    segmenter: str | None = None  # entropy model; default: the model the RM starts from
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.02
    max_samples: int | None = None
    prompt_key: str | None = None
    chosen_key: str | None = None
    rejected_key: str | None = None
    chat_template: str | None = None
    max_len: int = 2048
    max_prompt_len: int = 1728
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-6
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1  # cosine schedule floor, as a fraction of lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 128  # pairs per optimizer step, over all ranks
    micro_batch_size: int = 8  # pairs per forward on one rank
    margin: bool = False  # use score margins of the data in the loss when present
    zero_stage: int = 2
    bf16: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 0  # optimizer steps; 0: only at the end
    save_every: int = 0  # optimizer steps; 0: only at the end
    seed: int = 42
    nproc: int = 1
    resume: bool = False
    trust_remote_code: bool = False
    tensorboard: bool = False
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        check_positive(self, "batch_size", "micro_batch_size", "max_len", "max_prompt_len", "epochs", "nproc")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"--granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.entropy_threshold < 0:
            raise ValueError(f"--entropy-threshold must be >= 0, got {self.entropy_threshold}")
        if self.max_prompt_len >= self.max_len:
            raise ValueError(
                f"--max-prompt-len ({self.max_prompt_len}) must be below --max-len ({self.max_len}) "
                "to leave room for the response"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step, so that the global batch ignores the rank count."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                f"{self.micro_batch_size} × {world_size} rank(s)"
            )
        return self.batch_size // per_step


@dataclass
class RMEvalConfig:
    """`segppo rm eval`: pairwise accuracy and score statistics of a reward model."""

    model: str
    dataset: str
    split: str = "train"
    max_samples: int | None = None
    prompt_key: str | None = None
    chosen_key: str | None = None
    rejected_key: str | None = None
    max_len: int = 2048
    max_prompt_len: int = 1728
    batch_size: int = 8
    segmenter: str | None = None
    granularity: str | None = None  # for imported RMs whose folder records none
    threshold: float | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_positive(self, "batch_size", "max_len", "max_prompt_len")


def check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


# The paper's reward models (train_seg_rm.sh of its public code, README commands): preference_700K,
# one epoch, global batch 128, lr 1e-6, ZeRO-3, bf16, gradient checkpointing.
_PAPER_RM = dict(
    dataset="hendrydong/preference_700K",
    epochs=1,
    batch_size=128,
    lr=1e-6,
    max_len=2048,
    max_prompt_len=1728,
    zero_stage=3,
    bf16=True,
    gradient_checkpointing=True,
)
_BACKBONES = {
    "phi3-mini": ("microsoft/Phi-3-mini-4k-instruct", 1.75, 8),
    "llama3-sft-8b": ("RLHFlow/LLaMA3-SFT-v2", 2.0, 4),
    "llama3.1-instruct-8b": ("meta-llama/Llama-3.1-8B-Instruct", 2.0, 4),
}


def _rm_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for name, (model, threshold, micro) in _BACKBONES.items():
        for granularity in GRANULARITIES:
            presets[f"{name}-{granularity}"] = dict(
                _PAPER_RM,
                model=model,
                granularity=granularity,
                entropy_threshold=threshold,
                micro_batch_size=micro,
            )
    return presets


RM_PRESETS: dict[str, dict[str, Any]] = _rm_presets()


def normalize_keys(values: dict[str, Any], config_cls: type, source: str) -> dict[str, Any]:
    """Map option names (`max-len` or `max_len`) to field names; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    out = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in fields:
            raise ValueError(f"{source}: unknown option {key!r} (known: {', '.join(sorted(fields))})")
        out[name] = value
    return out


def load_config_file(path: str | Path, config_cls: type) -> dict[str, Any]:
    """Read a YAML config whose keys are option names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return normalize_keys(data, config_cls, str(path))


def preset_values(name: str, presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(presets))}")
    return dict(presets[name])


__all__ = ["RMConfig", "RMEvalConfig", "RM_PRESETS", "load_config_file", "normalize_keys", "preset_values"]
