"""The `segppo` command line: thin Typer commands that build a config and call the library."""

from __future__ import annotations

import os

import typer

from . import data, demo, normalizer, ppo, rm
from . import eval as eval_cli
from .help import GroupedHelpCommand

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
    # segppo draws its own progress; the libraries' per-file bars and load reports are noise here.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command(cls=GroupedHelpCommand)
def info() -> None:
    """Show versions, devices and which kernel path each op takes here."""
    from rich.console import Console

    from segppo.info import environment_table

    Console().print(environment_table())


app.add_typer(rm.app, name="rm")
app.add_typer(ppo.app, name="ppo")
app.add_typer(data.app, name="data")
app.command("demo", cls=GroupedHelpCommand)(demo.demo)
app.command("fit-normalizer", cls=GroupedHelpCommand)(normalizer.fit_normalizer)
app.command("eval", cls=GroupedHelpCommand)(eval_cli.eval_command)


def main() -> None:
    try:
        app()
    except SystemExit as end:
        # One rank of an outer launcher's (torchrun, deepspeed): a command that finished leaves as
        # `launch`'s ranks do, without Python's teardown, where a rank can still abort and fail
        # the job it finished. (The check on WORLD_SIZE keeps torch out of a plain `--help`.)
        if end.code in (0, None) and "WORLD_SIZE" in os.environ:
            from segppo.distributed import exit_without_teardown, one_of_several_ranks

            if one_of_several_ranks():
                exit_without_teardown()
        raise
