"""`segppo eval`: compare policies on a prompt set with a reward model or a Python scorer."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

from segppo.config import EvalConfig
from segppo.config_fields import RUN
from segppo.run_log import LOG_NAME

from .options import build_config, config_options, run_or_exit
from .tables import print_table

Opt = typer.Option


@config_options(EvalConfig)
def eval_command(
    values: dict[str, Any],
    as_json: Annotated[
        bool, Opt("--json", help="Print results.json instead of a table.", rich_help_panel=RUN)
    ] = False,
) -> None:
    """Generate with each policy, score with a reward model or a Python function, compare with the
    baseline (win rates, ties half), and export AlpacaEval / Arena-Hard / MT-Bench answer files."""
    from segppo.eval import evaluate

    cfg = build_config(EvalConfig, values)
    results = run_or_exit(lambda: evaluate(cfg, progress=not as_json), log=cfg.output_dir / LOG_NAME)
    if as_json:
        typer.echo(json.dumps(results.to_dict(), indent=2))
        return
    console = Console()
    print_table(console, results.table())
    for note in results.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"results: {results.results_file}", highlight=False)
