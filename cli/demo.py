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
    `--model smollm2` runs it on a real instruct model (SmolLM2-135M-Instruct) with a sentiment judge.
    """
    cfg = build_config(DemoConfig, values)
    if cfg.model == "smollm2":
        _real_demo(cfg)
    else:
        _synthetic_demo(cfg)


def _synthetic_demo(cfg: DemoConfig) -> None:
    from rich.console import Console

    from segppo.demo.pipeline import comparison_table, paired_table, results_table, run_demo, save_curves

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


def _real_demo(cfg: DemoConfig) -> None:
    from rich.console import Console

    from segppo.demo.real_pipeline import run_real_demo
    from segppo.demo.smollm2 import DownloadError
    from segppo.models.gguf import MissingExtra
    from segppo.rm.evaluate import SegmentView

    from .rm import render_segments

    def run():
        try:
            return run_real_demo(cfg)
        except (MissingExtra, DownloadError) as err:  # said in full by their one line
            raise ValueError(str(err)) from err

    summary = run_or_exit(run, log=Path(cfg.output) / LOG_NAME)
    console = Console()
    example = summary["example"]
    console.rule("[bold]a held-out response of the PPO policy, split into the reward model's segments")
    console.print(f"[bold]prompt:[/] {example['prompt']}  [dim](gold {example['gold']:+.3f})")
    for renderable in render_segments([SegmentView(**s) for s in example["segments"]]):
        console.print(renderable)
    base, ppo, gain = summary["base_gold"], summary["ppo_gold"], summary["gold_gain"]
    console.rule("[bold]gold reward (VADER sentiment, -1..1) on held-out prompts")
    console.print(f"base SmolLM2-135M-Instruct  {base['mean']:+.3f} ± {base['se']:.3f}")
    console.print(f"after PPO                   {ppo['mean']:+.3f} ± {ppo['se']:.3f}")
    ratio = gain["mean"] / gain["se"] if gain["se"] > 0 else float("inf")
    console.print(
        f"[bold]gain {gain['mean']:+.3f} ± {gain['se']:.3f}[/] (paired over {gain['responses']} responses, "
        f"{ratio:+.1f} s.e.); RM held-out accuracy {summary['rm_heldout_accuracy']}; "
        f"response length {summary['length']['base']:.1f} → {summary['length']['ppo']:.1f} tokens"
    )
    stages = ", ".join(f"{name} {s:.0f}s" for name, s in summary["seconds"].items())
    load = ", ".join(f"{x:.1f}" for x in summary["load_average"])
    console.print(
        f"total {summary['total_seconds']:.0f}s ({stages}), {summary['total_cpu_seconds']:.0f} CPU-s on "
        f"{summary['threads']} threads, load average {load}; artifacts in {cfg.output}/"
    )
