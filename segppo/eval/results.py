"""What `segppo eval` reports: per-policy statistics, the `results.json` layout and the rich table."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segppo.config import EvalConfig

from .generation import Generation
from .stats import MeanCI, WinRate


@dataclass
class PolicyResult:
    """One policy's generations and their summary.

    `score` is the scorer's score (the RM's sequence score, or the callable's); with a reward model
    `normalized_reward` is the PPO reward Σ_k n_k. Win rates are against the baseline on the same
    prompt and sample index (None for the baseline itself, or without a baseline).
    `response_length` is in the policy's tokens (final turn, stop token included);
    `segment_length` is the RM's tokens per segment.
    """

    name: str
    path: str
    generations: list[Generation]
    score: MeanCI
    normalized_reward: MeanCI | None
    response_length: MeanCI
    eos_fraction: float
    segments: float | None = None
    segment_length: float | None = None
    win_rate: WinRate | None = None
    win_rate_normalized: WinRate | None = None
    chat_template_source: str = ""
    chat_template_kwargs: dict[str, Any] | None = None  # the template variables the prompts had
    scored_as_generated: bool | None = None  # RM read the policy's ids as they are
    sampling: dict[str, Any] = field(default_factory=dict)  # `SamplingConfig.describe()`: greedy or how drawn
    truncated_prompts: int = 0
    exports: dict[str, str] = field(default_factory=dict)
    responses_file: str | None = None
    time_generation_s: float = 0.0
    time_scoring_s: float = 0.0

    @property
    def scores(self) -> list[float]:
        return [g.score for g in self.generations]  # type: ignore[misc]

    def to_dict(self, baseline: str | None) -> dict[str, Any]:
        def win(w: WinRate | None):
            return None if w is None else {"baseline": baseline, **w.to_dict()}

        return {
            "name": self.name,
            "path": self.path,
            "responses": len(self.generations),
            "score": self.score.to_dict(),
            "normalized_reward": None if self.normalized_reward is None else self.normalized_reward.to_dict(),
            "win_rate": win(self.win_rate),
            "win_rate_normalized": win(self.win_rate_normalized),
            "response_length": self.response_length.to_dict(),
            "eos_fraction": self.eos_fraction,
            "segments": self.segments,
            "segment_length": self.segment_length,
            "chat_template_source": self.chat_template_source,
            "chat_template_kwargs": self.chat_template_kwargs,
            "scored_as_generated": self.scored_as_generated,
            "sampling": self.sampling,
            "truncated_prompts": self.truncated_prompts,
            "exports": self.exports,
            "responses_file": self.responses_file,
            "time_generation_s": round(self.time_generation_s, 3),
            "time_scoring_s": round(self.time_scoring_s, 3),
        }


@dataclass
class EvalResults:
    """Everything `evaluate` measured; `to_dict()` is `results.json`."""

    config: EvalConfig
    policies: dict[str, PolicyResult]
    baseline: str | None
    scorer: dict[str, Any]
    prompts: dict[str, Any]
    output_dir: Path
    plot: str | None = None
    notes: list[str] = field(default_factory=list)
    token_len_counter: str = ""
    time_s: float = 0.0

    @property
    def results_file(self) -> Path:
        return self.output_dir / "results.json"

    def to_dict(self) -> dict[str, Any]:
        config = {k: _plain(v) for k, v in dataclasses.asdict(self.config).items()}
        return {
            "config": config,
            "prompts": self.prompts,
            "num_samples": self.config.num_samples,
            "turns": self.config.turns,
            "scorer": self.scorer,
            "baseline": self.baseline,
            "policies": {name: p.to_dict(self.baseline) for name, p in self.policies.items()},
            "token_len_counter": self.token_len_counter,
            "plot": self.plot,
            "notes": self.notes,
            "time_s": round(self.time_s, 3),
        }

    def table(self):
        """A rich Table: one row per policy."""
        from rich.table import Table

        rm = self.scorer.get("kind") == "reward_model"
        count = self.prompts.get("count")
        if self.config.greedy:
            title = f"segppo eval: {count} prompts, greedy decoding"
        else:
            title = f"segppo eval: {count} prompts × {self.config.num_samples} sample(s)"
        table = Table(title=title)
        table.add_column("policy")
        table.add_column("RM score (95% CI)" if rm else "score (95% CI)", justify="right")
        if rm:
            table.add_column("PPO reward (95% CI)", justify="right")
        if self.baseline is not None:
            table.add_column(f"win rate vs {self.baseline}", justify="right")
        table.add_column("length", justify="right")
        table.add_column("EOS", justify="right")
        if rm:
            table.add_column("segments", justify="right")
            table.add_column("seg. length", justify="right")
        for name, p in self.policies.items():
            row = [name, _ci(p.score)]
            if rm:
                row.append(_ci(p.normalized_reward))
            if self.baseline is not None:
                row.append("baseline" if name == self.baseline else _win(p.win_rate))
            row += [f"{p.response_length.mean:.1f}", f"{p.eos_fraction:.0%}"]
            if rm:
                row += [_num(p.segments, ".2f"), _num(p.segment_length, ".2f")]
            table.add_row(*row)
        return table


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    return value


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def _ci(m: MeanCI | None) -> str:
    if m is None:
        return "-"
    if not math.isfinite(m.se):
        return f"{m.mean:.4g}"
    return f"{m.mean:.4g} [{m.low:.4g}, {m.high:.4g}]"


def _win(w: WinRate | None) -> str:
    if w is None:
        return "-"
    se = f" ± {w.se:.1%}" if math.isfinite(w.se) else ""
    return f"{w.rate:.1%}{se}"
