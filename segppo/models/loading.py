"""Loading tokenizers and causal-LM backbones from the hub or local folders.

`trust_remote_code` is False unless a caller passes True: a checkpoint's `auto_map` must never
run code from the checkpoint by default (one of the paper code's defects, DESIGN §3.6).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from segppo.io import same_source

from .zero3 import is_zero3

DTYPES: dict[str, torch.dtype | str] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "auto": "auto",
}

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Map "bf16"/"fp16"/"fp32"/"auto" (or a torch.dtype) to what `from_pretrained` takes.

    None means float32, not the checkpoint's own dtype: a model that is trained must keep float32
    weights unless bf16 is asked for (then DeepSpeed's bf16 keeps float32 master weights), and most
    hub checkpoints are saved in bf16, which "auto" would train as plain bf16 parameters under AdamW.
    Pass "auto" for the checkpoint's dtype.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def use_safetensors_for(name_or_path: str | os.PathLike) -> bool | None:
    """True for a local folder holding safetensors weights, so a stray .bin is never unpickled.

    A local folder with only .bin weights and a hub name get None: transformers then prefers
    safetensors itself and falls back to .bin (loaded with `weights_only=True`).
    """
    path = Path(name_or_path)
    if path.is_dir() and any((path / name).is_file() for name in SAFETENSORS_FILES):
        return True
    return None


def pretrained_kwargs(name_or_path, dtype, trust_remote_code: bool) -> dict:
    """The keyword arguments every segppo `from_pretrained` of a model shares."""
    return dict(
        dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=use_safetensors_for(name_or_path),
    )


def local_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A hub name's snapshot folder (weights and config only), or the local folder itself:
    partitioned loading reads the safetensors files directly."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"]))


def same_model(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two model names denote the same model: `same_source` (equal names, one path), or two
    local folders that hold the same model (a copy): the same config.json and the same weight files
    (`_weights_fingerprint`). Hub names compare as names."""
    if same_source(a, b):
        return True
    if a is None or b is None or not (Path(a).is_dir() and Path(b).is_dir()):
        return False
    fingerprints = [_weights_fingerprint(Path(folder)) for folder in (a, b)]
    return fingerprints[0] is not None and fingerprints[0] == fingerprints[1]


# Blocks read of each weight file by `_weights_fingerprint`: 16 of 64 KiB, 1 MiB per file.
_SAMPLED_BLOCKS, _BLOCK_BYTES = 16, 1 << 16


def _weights_fingerprint(folder: Path) -> tuple | None:
    """config.json's content and, per weight file, its name, size and a hash of blocks spread evenly
    from its first byte to its last (None without a config or weights). A full hash would read
    gigabytes for what is only a warning; the size and the safetensors header (in the first block)
    pin names and shapes, and blocks spread over the file meet every part of the model, so two
    checkpoints of one architecture (a base and its fine-tune) differ in some block."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern) if p.is_file())
    if not files:
        return None
    weights = []
    for file in files:
        size, digest = file.stat().st_size, hashlib.sha256()
        with file.open("rb") as f:
            if size <= _SAMPLED_BLOCKS * _BLOCK_BYTES:
                digest.update(f.read())
            else:
                for i in range(_SAMPLED_BLOCKS):
                    f.seek(i * (size - _BLOCK_BYTES) // (_SAMPLED_BLOCKS - 1))
                    digest.update(f.read(_BLOCK_BYTES))
        weights.append((file.name, size, digest.hexdigest()))
    return json.dumps(config, sort_keys=True), weights


def check_not_adapter_only(folder: str | os.PathLike, label: str) -> None:
    """A `--lora-export adapter` folder holds peft's adapter files and no config.json: no model that
    transformers loads by itself. Say so in one line (`label`: the folder as the user named it)."""
    path = Path(folder).expanduser()
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{label}: {path.resolve()} holds a LoRA adapter alone (--lora-export adapter), not a model; "
            "load it onto its base with peft.PeftModel.from_pretrained, or export it merged (the default)"
        )


def check_not_a_classifier(folder: str | os.PathLike) -> None:
    """A reward model folder (a token- or sequence-classification head) holds no LM head:
    `AutoModelForCausalLM` would load its backbone and start a new random one, without an error."""
    try:
        config = json.loads((Path(folder).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return  # a hub name, or a folder transformers will report on itself
    heads = [str(a) for a in config.get("architectures") or []]
    if heads and all(a.endswith(("ForTokenClassification", "ForSequenceClassification")) for a in heads):
        raise ValueError(
            f"{folder}: a {heads[0]} (a reward model), not a causal LM; loaded as one its LM head "
            "would be new random weights"
        )


def load_tokenizer(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, add_pad_token: bool = False
) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token.

    Without one, EOS becomes the pad token: batches are masked by `attention_mask`, never by
    comparing ids with the pad id, so sharing the id is harmless. A tokenizer with neither pad nor
    EOS is an error unless `add_pad_token=True`, because adding a token changes the vocabulary and
    the caller must then resize the model's embeddings.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif add_pad_token:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
        else:
            raise ValueError(
                f"tokenizer of {name_or_path} has neither a pad nor an EOS token; pass add_pad_token=True "
                "to add '<pad>' (and resize the model's embeddings)"
            )
    return tokenizer


def load_policy(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    ds_config: dict | None = None,
) -> PreTrainedModel:
    """A causal LM (`AutoModelForCausalLM`) for the policy, the reference or the segmenter.

    With a ZeRO-3 `ds_config` (the DeepSpeed config of the model's engine) the model is built
    partitioned, no rank ever holding it whole (`segppo.models.zero3`)."""
    check_not_adapter_only(name_or_path, "the causal LM")
    check_not_a_classifier(name_or_path)
    if is_zero3(ds_config):
        from .zero3 import from_pretrained_partitioned

        model = from_pretrained_partitioned(
            AutoModelForCausalLM,
            local_model_folder(name_or_path),
            ds_config,
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, **pretrained_kwargs(name_or_path, dtype, trust_remote_code)
        )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing works with frozen inputs (embeddings) and with DeepSpeed; a KV
    # cache is useless while recomputing activations and only costs memory.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn every dropout layer off: RLHF's models (RM, critic, policy) train without it, which
    also makes a step independent of how many ranks share it."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
