"""A GGUF checkpoint as an ordinary Hugging Face folder (safetensors), converted once.

transformers reads GGUF files (dequantizing them to float32 with the `gguf` package) but refuses to
`save_pretrained` a model loaded that way ("quantized with gguf and is not serializable"). The
conversion therefore builds a fresh model of the same config without its `quantization_config`,
copies the dequantized weights in, re-ties tied embeddings, and saves that with the tokenizer (and
its chat template) and the generation config. The folder is written atomically.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from segppo.io import atomic_folder

# The extra that brings what reading a GGUF file needs (pyproject.toml's `real`).
GGUF_EXTRA = "real"


class MissingExtra(ImportError):
    """A package of one of segppo's extras is not installed; the message names the extra."""


def require_gguf() -> None:
    """A one-line error naming the extra when transformers' GGUF reader cannot run here."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(
            f"reading a GGUF checkpoint needs {' and '.join(missing)}: pip install -e '.[{GGUF_EXTRA}]'"
        )


def convert_gguf(gguf_file: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the model and tokenizer of `gguf_file` to `output` as a float32 safetensors folder."""
    require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32 tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True keeps the loaded tensors (the fresh model's random ones are freed).
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{gguf_file}: converted weights do not match the {type(model).__name__} config "
            f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})"
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    out = Path(output)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
