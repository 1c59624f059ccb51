"""`segppo rm train|eval|inspect`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from segppo.config import RMConfig, RMEvalConfig
from segppo.config_fields import DATA, MODEL, RUN, SEGMENTS
from segppo.presets import RM_PRESETS
from segppo.run_log import LOG_NAME
from segppo.segment_stats import SegmentStats

from .help import GroupedHelpCommand
from .options import build_config, config_options, run_or_exit
from .tables import print_table

app = typer.Typer(help="Train, evaluate and inspect reward models.", no_args_is_help=True)
console = Console()

Opt = typer.Option


@app.command("train", cls=GroupedHelpCommand)
@config_options(RMConfig, RM_PRESETS)
def train(values: dict[str, Any]) -> None:
    """Train a segment-, token- or bandit-level reward model on preference pairs."""
    from segppo.rm.trainer import train_reward_model

    cfg = build_config(RMConfig, values)
    run_or_exit(lambda: train_reward_model(cfg), log=cfg.output_dir / LOG_NAME)


@app.command("eval", cls=GroupedHelpCommand)
@config_options(RMEvalConfig)
def evaluate(
    values: dict[str, Any],
    as_json: Annotated[
        bool, Opt("--json", help="Print JSON instead of a table.", rich_help_panel=RUN)
    ] = False,
) -> None:
    """Pairwise accuracy and score statistics of a reward model (never on its training rows)."""
    from segppo.rm.evaluate import evaluate_reward_model

    cfg = build_config(RMEvalConfig, values)
    stats = run_or_exit(lambda: evaluate_reward_model(cfg))
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    table = Table(title=f"reward model {cfg.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    print_table(console, table)


def _reward_style(value: float, scale: float) -> str:
    """Red for negative, green for positive rewards, brighter when larger."""
    level = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    channel = int(80 + 175 * level)
    return f"on rgb({channel},40,40)" if value < 0 else f"on rgb(40,{channel},40)"


def training_segments_lines(metadata) -> list[str]:
    """What segppo.json records of how the RM's training responses segmented, and how τ was chosen."""
    lines = []
    choice = metadata.threshold_choice or {}
    if choice.get("rule") == "auto":
        lines.append(
            f"threshold chosen by auto: the {choice['quantile']:.3f} quantile of the segmenter's entropy for "
            f"{choice['segment_length']:g} tokens per segment on {choice['responses']:,} training responses"
        )
    elif choice.get("rule") == "given":
        lines.append("threshold given (--entropy-threshold)")
    if metadata.segment_stats:
        stats = SegmentStats.from_record(metadata.segment_stats)
        lines.append(f"training data: {stats.summary()}")
        warning = stats.warning(metadata.granularity)
        if warning:
            lines.append(f"[yellow]warning:[/] {warning}")
    return lines


@app.command("inspect", cls=GroupedHelpCommand)
def inspect(
    model: Annotated[
        str, Opt(help="Reward model folder (or run folder) or hub name.", rich_help_panel=MODEL)
    ],
    prompt: Annotated[str, Opt(help="The user prompt.", rich_help_panel=DATA)],
    response: Annotated[str, Opt(help="The assistant response to split and score.", rich_help_panel=DATA)],
    segmenter: Annotated[
        str | None, Opt(help="Override the segmenter recorded in segppo.json.", rich_help_panel=SEGMENTS)
    ] = None,
    granularity: Annotated[
        str | None, Opt(help="For imported RMs that record none.", rich_help_panel=SEGMENTS)
    ] = None,
    threshold: Annotated[
        float | None, Opt(help="Entropy threshold, with --granularity segment.", rich_help_panel=SEGMENTS)
    ] = None,
    trust_remote_code: Annotated[
        bool, Opt(help="Allow model code from the hub (off by default).", rich_help_panel=MODEL)
    ] = False,
) -> None:
    """Show a response split into the RM's segments, each coloured by its reward."""
    from segppo.rm.evaluate import inspect_response
    from segppo.rm.scoring import load_scorer

    def run():
        scorer = load_scorer(
            model,
            segmenter=segmenter,
            granularity=granularity,
            threshold=threshold,
            trust_remote_code=trust_remote_code,
        )
        return scorer, inspect_response(scorer, prompt, response)

    scorer, segments = run_or_exit(run)
    seg_info = scorer.segmentation
    shown = f" (threshold {seg_info.threshold:.4g})" if seg_info.granularity == "segment" else ""
    console.print(f"[bold]{seg_info.granularity}[/] segments{shown}:")
    for renderable in render_segments(segments):
        console.print(renderable)
    for line in training_segments_lines(scorer.metadata):
        console.print(line)


def render_segments(segments) -> tuple[Text, Table]:
    """A response's segments (`segppo.rm.evaluate.SegmentView`s) as text coloured by each segment's
    reward, and a table of their rewards (`rm inspect`, `segppo demo --model smollm2`)."""
    scale = max((abs(s.reward) for s in segments if s.index), default=1.0)
    text = Text()
    for seg in segments:
        text.append(seg.text, style=_reward_style(seg.reward, scale) if seg.index else "dim")
    table = Table()
    for column in ("k", "segment", "tokens", "reward", "normalized", "entropy at end"):
        table.add_column(column, justify="left" if column == "segment" else "right")
    for seg in segments:
        table.add_row(
            str(seg.index) if seg.index else "-",
            repr(seg.text),
            f"{seg.start}-{seg.end}",
            f"{seg.reward:.4f}" if seg.index else "",
            f"{seg.normalized:.4f}" if seg.normalized is not None else "",
            f"{seg.entropy_at_end:.3f}" if seg.index else "",
        )
    return text, table
