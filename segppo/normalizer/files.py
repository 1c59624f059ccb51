"""The normalizer's files: `normalizer.json` (save, load) and the paper's `param.json` (import)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segppo.io import atomic_write_text
from segppo.kernels import resolve_granularity

from .core import DEFAULT_SIGMA_FLOOR, Normalizer, check_floor, is_number

NORMALIZER_FILE = "normalizer.json"
# Level names of the paper's param.json, outermost first; used in error messages.
PARAM_JSON_LEVELS = ("model", "dataset", "method", "agg", "threshold")


def normalizer_json(normalizer: Normalizer) -> str:
    """The text of `normalizer.json`; a ValueError for values JSON cannot hold (NaN, inf, objects)."""
    try:
        return json.dumps(normalizer.to_dict(), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"normalizer is not JSON-serialisable: {e}") from e


def save_normalizer(normalizer: Normalizer, path: str | os.PathLike) -> Path:
    """Write `normalizer.json` atomically (a folder path gets `normalizer.json` inside); returns the file.

    The JSON text is made before anything is written, and the file goes to a temporary
    sibling renamed over the target, so a failure leaves any previous file untouched.
    """
    path = normalizer_file(path)
    atomic_write_text(path, normalizer_json(normalizer))
    return path


def load_normalizer(path: str | os.PathLike) -> Normalizer:
    """Read and validate a `normalizer.json` (or a folder holding one)."""
    path = normalizer_file(path)
    return Normalizer.from_dict(_read_json(path), where=str(path))


def normalizer_file(path: str | os.PathLike) -> Path:
    """The file a normalizer `path` names: `path/normalizer.json` for a folder, else `path` itself."""
    path = Path(path)
    return path / NORMALIZER_FILE if path.is_dir() else path


# --------------------------------------------------------------------------------------------
# The paper's param.json


def import_param_json(
    path: str | os.PathLike, key: str | Sequence[str], *, sigma_floor: float = DEFAULT_SIGMA_FLOOR
) -> Normalizer:
    """The normalizer stored in the paper's `param.json` under `key`.

    The file nests `model → dataset → method → agg → threshold → [a, b, c, d]`; `key` is the path
    through it, "/"-separated ("phi3-instruct/preference700k_60000/peak/avg/1.75") or a list. A
    numeric level matches numerically ("2" finds "2.0"). A missing level is a ValueError naming it
    and listing the keys available there.
    """
    path = Path(path)
    parts = [str(k) for k in (key.split("/") if isinstance(key, str) else key)]
    node = _read_json(path)
    walked: list[str] = []
    for part in parts:
        level = _level_name(len(walked))
        if not isinstance(node, dict):
            raise ValueError(
                f"{path}: key {'/'.join(parts)!r} is too long: {'/'.join(walked)!r} is already a leaf"
            )
        found = _find_key(node, part)
        if found is None:
            where = f" under {'/'.join(walked)!r}" if walked else ""
            raise ValueError(f"{path}: no {level} {part!r}{where}; available: {', '.join(map(str, node))}")
        walked.append(found)
        node = node[found]
    if isinstance(node, dict):
        raise ValueError(
            f"{path}: key {'/'.join(walked)!r} stops at the {_level_name(len(walked))} level; "
            f"continue with one of: {', '.join(map(str, node))}"
        )
    if not (isinstance(node, list) and len(node) == 4 and all(is_number(x) for x in node)):
        raise ValueError(
            f"{path}: {'/'.join(walked)!r} must hold 4 finite numbers [a, b, c, d], got {node!r}"
        )

    # Names for the record only when the key has the paper's five levels.
    named = dict(zip(PARAM_JSON_LEVELS, walked, strict=True)) if len(walked) == len(PARAM_JSON_LEVELS) else {}
    threshold = _as_float(named.get("threshold"))
    granularity = None
    if threshold is not None and threshold >= 0:  # the paper's 0 and 1000 mean token and bandit
        granularity = resolve_granularity("segment", threshold)
    normalizer = Normalizer(
        params=tuple(node),
        sigma_floor=sigma_floor,
        source="param.json",
        granularity=granularity,
        threshold=threshold,
        reward_model=named.get("model"),
        dataset=named.get("dataset"),
        notes=[f"imported from {path.name}, key {'/'.join(walked)}"],
    )
    return check_floor(normalizer)


def param_json_keys(path: str | os.PathLike) -> list[str]:
    """Every full key path of a `param.json` ("model/dataset/method/agg/threshold"), in file order."""

    def walk(node, prefix: list[str]):
        if not isinstance(node, dict):
            yield "/".join(prefix)
            return
        for k, child in node.items():
            yield from walk(child, [*prefix, str(k)])

    return list(walk(_read_json(Path(path)), []))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _find_key(node: dict, part: str) -> str | None:
    """The key of `node` equal to `part`, or else the one equal to it as a number (thresholds)."""
    if part in node:
        return part
    value = _as_float(part)
    if value is None:
        return None
    matches = [k for k in node if _as_float(k) == value]
    return matches[0] if len(matches) == 1 else None


def _as_float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _level_name(depth: int) -> str:
    return PARAM_JSON_LEVELS[depth] if depth < len(PARAM_JSON_LEVELS) else f"level {depth + 1}"
