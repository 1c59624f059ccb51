"""`segppo data inspect`: a dataset as the training commands will read it, before a long run."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from segppo.config import DataInspectConfig

from .help import GroupedHelpCommand
from .options import build_config, config_options, run_or_exit
from .tables import print_table

app = typer.Typer(
    help="Check data before a run: how the training commands will read it.", no_args_is_help=True
)

USED_BY = {"preference": "rm train, fit-normalizer, rm eval", "prompt": "ppo train, eval"}


@app.command("inspect", cls=GroupedHelpCommand)
@config_options(DataInspectConfig)
def inspect_command(values: dict[str, Any]) -> None:
    """Show how the training commands read a dataset: the detected layout, rows per split, rows kept
    and skipped with the first reasons, one row as the model reads it (chat template, where the
    response starts, the stop) and token lengths against --max-len and --max-prompt-len."""
    from segppo.data.inspection import inspect_data

    cfg = build_config(DataInspectConfig, values)
    print_inspection(Console(highlight=False), run_or_exit(lambda: inspect_data(cfg)))


def _visible(text: str) -> str:
    """Newlines shown (`↵`), so that the template's own line breaks can be seen and counted."""
    return text.replace("\n", "↵\n").removesuffix("\n")


def _facts(report) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # a path is one word: folded over lines, never cut to "…"
    splits = ", ".join(f"{name} {rows:,} rows" for name, rows in report.splits.items())
    table.add_row("data", report.source)
    table.add_row("splits", splits)
    what = "preference pairs" if report.kind == "preference" else "prompts"
    layout = f", layout {report.layout}" if report.layout else ""
    table.add_row("read as", f"{what}{layout} (as {USED_BY[report.kind]} read it)")
    for part in report.parts:
        if part.error is not None:
            table.add_row(part.name, Text(f"{part.source}: {part.rows:,} rows, none usable: {part.error}"))
            continue
        r = part.report
        kept = f"{part.source}: {part.rows:,} rows, kept {r.kept:,}, skipped {r.skipped:,}"
        table.add_row(part.name, Text("\n".join([kept, *(f"  {reason}" for reason in r.reasons)])))
    return table


def _example(console: Console, report) -> None:
    example = report.example
    if example is None:
        return
    if example.prompt is None:
        console.print(
            Text(f"\n{example.part} row {example.row} as the layout reads it (--model shows tokens):", "bold")
        )
        for message in example.messages:
            console.print(Text(f"{message['role']}: {message['content']}"))
        for name, text in example.response_texts.items():
            console.print(Text(f"{name}: {text}"))
        return
    console.print(Text(f"\n{example.part} row {example.row} as the model reads it:", "bold"))
    prompt = example.prompt
    cut = ""
    if prompt.truncated:  # rm train truncates; ppo train and eval only with --long-prompts truncate
        cut = (
            " (truncated" + ("" if report.kind == "preference" else " as --long-prompts truncate does") + ")"
        )
    console.print(Text(f"prompt, {prompt.tokens} tokens{cut}:", "bold"))
    console.print(Text(_visible(prompt.text)))
    starts = "the response starts" if report.kind == "preference" else "generation starts"
    console.print(Text(f"── {starts} here, after token {prompt.tokens} ──", "bold"))
    for response in example.responses:
        end = f"ends with the stop {response.stop}" if response.stop else "cut at --max-len: no stop"
        console.print(Text(f"{response.name}, {response.tokens} tokens, {end}:", "bold"))
        console.print(Text(_visible(response.text)))
    console.print(Text(f"stop tokens: {' '.join(report.stop_tokens)}"))


def _lengths(report) -> Table:
    title = f"tokens of the first {report.measured_rows:,} kept {report.parts[0].name} rows, untruncated"
    table = Table(title=title)
    for column in ("", "min", "median", "p95", "max", "over limit"):
        table.add_column(column, justify="left" if not column else "right")
    for lengths in report.lengths:
        table.add_row(
            lengths.name,
            str(min(lengths.values)),
            f"{lengths.median:g}",
            str(lengths.quantile(0.95)),
            str(max(lengths.values)),
            "" if lengths.limit is None else f"{lengths.over:,} > {lengths.limit}",
        )
    return table


def print_inspection(console: Console, report) -> None:
    console.print(_facts(report))
    _example(console, report)
    if report.lengths:
        console.print()
        print_table(console, _lengths(report))
        limits = [f"{x.limit_option} {x.limit}" for x in report.lengths if x.limit is not None]
        console.print(f"limits: {', '.join(limits)}")
        if report.kind == "preference":
            console.print(
                "Over the limits a run cuts the prompt's oldest turns first (never the template's tokens), "
                "then the responses' ends (they lose their stop).",
                style="dim",
            )
        else:
            console.print(
                "Over --max-prompt-len, ppo train and eval stop with an error naming the row "
                "(--long-prompts truncate cuts the oldest turns instead).",
                style="dim",
            )
    for note in report.system_notes:
        console.print(f"note: {note}", style="yellow")
