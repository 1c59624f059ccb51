"""Shared CLI plumbing: `--config FILE` and `--preset NAME` feed click's `default_map`.

Precedence, lowest first: the command's defaults, the preset, the YAML config file, explicit flags.
Both options are eager, so their values are in place before any other option is read.
"""

from __future__ import annotations

from typing import Any

import click
import typer

from segppo.config import load_config_file, preset_values


def _refresh_default_map(ctx: click.Context) -> None:
    merged = dict(ctx.meta.get("segppo.preset", {}))
    merged.update(ctx.meta.get("segppo.config", {}))
    ctx.default_map = {**(ctx.default_map or {}), **merged}


def config_option(config_cls: type):
    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value:
            try:
                ctx.meta["segppo.config"] = load_config_file(value, config_cls)
            except (FileNotFoundError, ValueError) as err:
                raise click.BadParameter(str(err), ctx=ctx, param=param) from err
            _refresh_default_map(ctx)
        return value

    return typer.Option(
        None, "--config", help="YAML file whose keys are option names; explicit flags win.",
        is_eager=True, callback=callback, show_default=False,
    )


def preset_option(presets: dict[str, dict[str, Any]]):
    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value:
            try:
                ctx.meta["segppo.preset"] = preset_values(value, presets)
            except ValueError as err:
                raise click.BadParameter(str(err), ctx=ctx, param=param) from err
            _refresh_default_map(ctx)
        return value

    return typer.Option(
        None, "--preset", help=f"One of the paper's runs: {', '.join(sorted(presets))}.",
        is_eager=True, callback=callback, show_default=False,
    )


def build_config(config_cls: type, values: dict[str, Any]):
    """Build a config dataclass; a bad value becomes a usage error naming the option."""
    try:
        return config_cls(**values)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
