"""The `segppo` command line: thin Typer commands that build a config and call the library."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="segppo",
    help="RLHF with segment-level rewards: reward models, normalizer, PPO and evaluation.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the installed segppo version."""
    from importlib.metadata import version as pkg_version

    typer.echo(pkg_version("segppo"))


def main() -> None:
    app()
