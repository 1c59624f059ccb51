"""`segppo demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segppo.config import DemoConfig

from .options import build_config, run_or_exit

Opt = typer.Option


def demo(
    output: Annotated[str, Opt(help="Folder for every artifact of the run.")] = "segppo-demo",
    budget: Annotated[
        str, Opt(help="small (about a minute) | default (at most 5 minutes on 2 CPU cores).")
    ] = ("default"),
    compare: Annotated[str | None, Opt(help="Granularities to compare, e.g. bandit,token,segment.")] = None,
    seeds: Annotated[int, Opt(help="Seeds per setting (with --compare).")] = 1,
    seed: Annotated[int, Opt()] = 0,
    cache_dir: Annotated[str | None, Opt(help="SFT policy cache (default ~/.cache/segppo/demo).")] = None,
    threads: Annotated[int | None, Opt(help="torch CPU threads.")] = None,
) -> None:
    """Run the whole method on a built-in synthetic task whose gold reward is known.

    SFT policy (cached) → preference pairs labelled by the gold reward → rm train → fit-normalizer
    → ppo train → eval, through the same code as the commands, then a table of gold reward.
    """
    values = dict(locals())
    from rich.console import Console

    from segppo.demo.pipeline import comparison_table, results_table, run_demo, save_curves

    cfg = build_config(DemoConfig, values)
    summary = run_or_exit(lambda: run_demo(cfg))
    console = Console()
    console.print(results_table(summary))
    if cfg.compare:
        console.print(comparison_table(summary))
    plot = save_curves(summary, Path(cfg.output) / "rewards_across_ppo_steps.png")
    console.print(
        f"total {summary['total_seconds']:.0f}s (task data {summary['prepare_seconds']:.0f}s); "
        f"artifacts in {cfg.output}/, curves in {plot}"
    )
