"""`segppo.json`: what a checkpoint folder was trained for, written beside its weights.

The weights alone do not say how a reward model must be read: a segment-level RM scored at
entropy-spike ends with a location-aware normalizer gives wrong rewards when read as a bandit RM.
This record travels with the folder so that PPO, evaluation and inspection read it the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segppo.kernels import GRANULARITIES

METADATA_FILE = "segppo.json"
KINDS = ("reward_model", "policy")


def segppo_version() -> str:
    try:
        return importlib.metadata.version("segppo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class MetadataError(ValueError):
    """A `segppo.json` (or a metadata object) that is malformed; the message names file and field."""


@dataclass
class SegppoMetadata:
    """The contents of `segppo.json`.

    `normalizer` is None or `{"params": [a, b, c, d], "sigma_floor": float, ...}` (DESIGN §3.3;
    extra keys such as fit statistics are kept). `score_mean`/`score_std` are global score
    statistics, i.e. the normalizer `[0, 0, mean, std]` of a bandit RM. `data` is free-form:
    dataset name or path, split, sample counts. Keys this version does not know are kept in
    `extra` and written back, so an older segppo does not drop what a newer one recorded.
    `chat_template`, `chat_template_kwargs` (its variables, null when none and in files written
    before they were recorded), `stop_token_ids` and `end_of_turn_id` are the chat format a reward
    model was trained with (`ChatFormat.metadata_fields()`); `ChatFormat.from_metadata` reads them back.
    `threshold_choice` says how a segment RM's threshold was chosen (`{"rule": "given"}`, or `auto`
    with its target length and quantile) and `segment_stats` how its training responses segment
    (`segppo.segment_stats.SegmentStats`, with the sample it was measured on).
    """

    kind: str
    granularity: str | None = None
    threshold: float | None = None
    threshold_choice: dict[str, Any] | None = None
    segment_stats: dict[str, Any] | None = None
    segmenter: str | None = None
    normalizer: dict[str, Any] | None = None
    score_mean: float | None = None
    score_std: float | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    stop_token_ids: list[int] | None = None
    end_of_turn_id: int | None = None
    data: dict[str, Any] | None = None
    base_model: str | None = None
    segppo_version: str = field(default_factory=segppo_version)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> SegppoMetadata:
        """Raise MetadataError naming the first bad field; returns self."""
        _check(self.kind in KINDS, "kind", f"must be one of {KINDS}", self.kind)
        _check(
            self.granularity is None or self.granularity in GRANULARITIES,
            "granularity",
            f"must be one of {GRANULARITIES} or null",
            self.granularity,
        )
        _check_number("threshold", self.threshold, minimum=0.0)
        _check(
            self.granularity != "segment" or self.threshold is not None,
            "threshold",
            "is required when granularity is 'segment'",
            self.threshold,
        )
        for name in ("segmenter", "chat_template", "base_model", "segppo_version"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str), name, "must be a string or null", value)
        _check(
            self.stop_token_ids is None
            or (
                isinstance(self.stop_token_ids, list)
                and self.stop_token_ids
                and all(_is_token_id(i) for i in self.stop_token_ids)
            ),
            "stop_token_ids",
            "must be a non-empty list of token ids or null",
            self.stop_token_ids,
        )
        _check(
            self.end_of_turn_id is None or _is_token_id(self.end_of_turn_id),
            "end_of_turn_id",
            "must be a token id or null",
            self.end_of_turn_id,
        )
        _check_number("score_mean", self.score_mean)
        _check_number("score_std", self.score_std, minimum=0.0, strict=True)
        for name in ("data", "normalizer", "threshold_choice", "segment_stats", "chat_template_kwargs"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, dict), name, "must be an object or null", value)
        _check(isinstance(self.extra, dict), "extra", "must be a dict", self.extra)
        if self.normalizer is not None:
            params = self.normalizer.get("params")
            _check(
                isinstance(params, list | tuple) and len(params) == 4 and all(_is_number(p) for p in params),
                "normalizer.params",
                "must be a list of 4 finite numbers [a, b, c, d]",
                params,
            )
            _check_number("normalizer.sigma_floor", self.normalizer.get("sigma_floor"), 0.0, strict=True)
        return self

    def to_dict(self) -> dict[str, Any]:
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **known}

    def to_json(self) -> str:
        """Validated JSON text; raises MetadataError for values JSON cannot hold (NaN, objects)."""
        self.validate()
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise MetadataError(f"segppo metadata is not JSON-serialisable: {e}") from e

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegppoMetadata:
        if not isinstance(values, dict):
            raise MetadataError(f"segppo metadata must be a JSON object, got {type(values).__name__}")
        if "kind" not in values:
            raise MetadataError("field 'kind' is missing")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        return cls(**known, extra=extra).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> SegppoMetadata:
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise MetadataError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(values)
        except MetadataError as e:
            raise MetadataError(f"{path}: {e}") from e


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `true` is never a meaningful threshold or std.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check(ok: bool, name: str, requirement: str, value: Any) -> None:
    if not ok:
        raise MetadataError(f"field '{name}' {requirement}, got {value!r}")


def _check_number(name: str, value: Any, minimum: float | None = None, strict: bool = False) -> None:
    if value is None:
        return
    _check(_is_number(value), name, "must be a finite number or null", value)
    if minimum is not None:
        ok = value > minimum if strict else value >= minimum
        _check(ok, name, f"must be {'>' if strict else '>='} {minimum}", value)
