"""`segppo demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segppo.config import DemoConfig
from segppo.run_log import LOG_NAME

from .options import build_config, config_options, run_or_exit
from .tables import print_table


@config_options(DemoConfig)
def demo(values: dict[str, Any]) -> None:
    """Run the whole method on a built-in synthetic task whose gold reward is known.

    SFT policy (cached) → preference pairs labelled by the gold reward → rm train → fit-normalizer
    → ppo train → eval, through the same code as the commands, then a table of gold reward.
    """
    from rich.console import Console

    from segppo.demo.pipeline import comparison_table, paired_table, results_table, run_demo, save_curves

    cfg = build_config(DemoConfig, values)
    summary = run_or_exit(lambda: run_demo(cfg), log=Path(cfg.output) / LOG_NAME)
    console = Console()
    print_table(console, results_table(summary))
    if cfg.compare:
        print_table(console, comparison_table(summary))
        print_table(console, paired_table(summary))
        if not summary["is_comparison"]:
            console.print(
                f"[yellow]the {summary['budget']} budget is a pipeline check for CI, not a comparison"
            )
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    plot = save_curves(summary, Path(cfg.output) / "rewards_across_ppo_steps.png")
    console.print(
        f"total {summary['total_seconds']:.0f}s (task data {summary['prepare_seconds']:.0f}s); "
        f"artifacts in {cfg.output}/, curves in {plot}"
    )
