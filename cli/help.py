"""`--help` of the segppo commands: options in panels by purpose, required ones first, names whole.

An option's panel is declared once, where the option is: the `panel` of its config field
(`segppo.config_fields.option`), or `rich_help_panel` of a command's own `typer.Option`. The
panels come in the order of `segppo.config_fields.PANELS`, after a panel of the required options.

Why not Typer's own rich help: it gives an option's name, its `--no-` form and its type a column
each, and at 80 columns (a log, CI, a narrow terminal) rich shortens them to `--entropy-thresho…`.
Here the name column is as wide as the longest name (a `--no-` form on its own line) and the help
wraps beside it, or below it when the names leave the help too little room.
"""

from __future__ import annotations

import inspect

import click
from rich.console import Console, Group
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

from segppo.config_fields import PANELS, RUN

REQUIRED = "Required"
OTHER = "Other options"
# Below this many columns for the help text, it goes under the option names instead of beside them.
MIN_HELP_WIDTH = 28


class GroupedHelpCommand(TyperCommand):
    """A Typer command whose `--help` groups its options into panels (see the module doc)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        print_help(self, ctx, Console(highlight=False))


def panel_of(param: click.Parameter, ctx: click.Context) -> str:
    """The panel `param` is shown in: required ones first, else the one it declares."""
    if param.required:
        return REQUIRED
    if param is ctx.command.get_help_option(ctx):
        return RUN
    return getattr(param, "rich_help_panel", None) or OTHER


def _panel_order(name: str) -> int:
    order = (REQUIRED, *PANELS)
    return order.index(name) if name in order else len(order) + (name == OTHER)


def grouped_params(command: click.Command, ctx: click.Context) -> dict[str, list[click.Parameter]]:
    """The command's visible parameters by panel, in the order they are shown."""
    panels: dict[str, list[click.Parameter]] = {}
    for param in command.get_params(ctx):
        if not getattr(param, "hidden", False):
            panels.setdefault(panel_of(param, ctx), []).append(param)
    return dict(sorted(panels.items(), key=lambda item: _panel_order(item[0])))


def _names(param: click.Parameter, ctx: click.Context) -> tuple[str, str]:
    """(names, help) of a parameter: each of its names on a line of its own (`--x` then `--no-x`)."""
    record = param.get_help_record(ctx)
    if record is None:  # a click argument without help
        return param.make_metavar(ctx), ""
    names, help_text = record
    return names.replace(" / ", "\n"), help_text


def _panel(title: str, rows: list[tuple[str, str]], width: int) -> Panel:
    name_width = max(len(line) for names, _ in rows for line in names.splitlines())
    inner = width - 4  # the panel's border and padding
    if inner - name_width - 2 >= MIN_HELP_WIDTH:
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True, min_width=name_width, style="bold cyan")
        table.add_column(ratio=1)
        for names, help_text in rows:
            table.add_row(names, Text(help_text))
        body = table
    else:
        body = Group(
            *(
                Group(Text(names, style="bold cyan"), Padding(Text(help_text), (0, 0, 0, 4)))
                for names, help_text in rows
            )
        )
    return Panel(body, title=title, title_align="left", border_style="dim")


def print_help(command: click.Command, ctx: click.Context, console: Console) -> None:
    console.print(Padding(Text(command.get_usage(ctx)), (1, 1)))
    if command.help:
        paragraphs = inspect.cleandoc(command.help).split("\n\n")
        text = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        console.print(Padding(Text(text), (0, 1, 1, 1)))
    for title, params in grouped_params(command, ctx).items():
        console.print(_panel(title, [_names(p, ctx) for p in params], console.width))
