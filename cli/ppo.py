"""`segppo ppo train`."""

from __future__ import annotations

from typing import Any

import typer

from segppo.config import PPOConfig
from segppo.presets import PPO_PRESETS
from segppo.run_log import LOG_NAME

from .help import GroupedHelpCommand
from .options import build_config, config_options, run_or_exit

app = typer.Typer(help="PPO with segment-, token- or bandit-level rewards.", no_args_is_help=True)


@app.command("train", cls=GroupedHelpCommand)
@config_options(PPOConfig, PPO_PRESETS)
def train(values: dict[str, Any]) -> None:
    """Train a policy with PPO against the reward model's dense (or bandit) rewards."""
    from segppo.ppo.trainer import train_ppo

    cfg = build_config(PPOConfig, values)
    run_or_exit(lambda: train_ppo(cfg), log=cfg.output_dir / LOG_NAME)
