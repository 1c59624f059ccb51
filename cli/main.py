"""The `segppo` command line: thin Typer commands that build a config and call the library."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="segppo",
    help="RLHF with segment-level rewards: reward models, a location-aware normalizer, PPO and evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def root() -> None:
    """segppo: RLHF with segment-level rewards."""


@app.command()
def info() -> None:
    """Show versions, devices and which kernel path each op takes here."""
    from rich.console import Console

    from segppo.info import environment_table

    Console().print(environment_table())


def main() -> None:
    app()
