"""Shared CLI plumbing: `--config FILE` and `--preset NAME` feed click's `default_map`.

Precedence, lowest first: the command's defaults, the preset, the YAML config file, explicit flags.
Both options are eager, so their values are in place before any other option is read.
"""

from __future__ import annotations

from typing import Any

import typer

from segppo.config import load_config_file, preset_values


def _refresh_default_map(ctx: typer.Context) -> None:
    merged = dict(ctx.meta.get("segppo.preset", {}))
    merged.update(ctx.meta.get("segppo.config", {}))
    ctx.default_map = {**(ctx.default_map or {}), **merged}


def config_option(config_cls: type):
    def callback(ctx: typer.Context, param: typer.CallbackParam, value: str | None):
        if value:
            try:
                ctx.meta["segppo.config"] = load_config_file(value, config_cls)
            except (FileNotFoundError, ValueError) as err:
                raise typer.BadParameter(str(err), ctx=ctx, param=param) from err
            _refresh_default_map(ctx)
        return value

    return typer.Option(
        "--config",
        help="YAML file whose keys are option names; explicit flags win.",
        is_eager=True,
        callback=callback,
        show_default=False,
    )


def preset_option(presets: dict[str, dict[str, Any]]):
    def callback(ctx: typer.Context, param: typer.CallbackParam, value: str | None):
        if value:
            try:
                ctx.meta["segppo.preset"] = preset_values(value, presets)
            except ValueError as err:
                raise typer.BadParameter(str(err), ctx=ctx, param=param) from err
            _refresh_default_map(ctx)
        return value

    return typer.Option(
        "--preset",
        help=f"One of the paper's runs: {', '.join(sorted(presets))}.",
        is_eager=True,
        callback=callback,
        show_default=False,
    )


def build_config(config_cls: type, values: dict[str, Any]):
    """Build a config dataclass; a bad value becomes a usage error naming the option."""
    try:
        return config_cls(**values)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


# Errors that describe bad input: shown as one clear line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


def run_or_exit(fn):
    """Run `fn()`; a user error becomes a red one-line message and exit status 2."""
    try:
        return fn()
    except USER_ERRORS as err:
        from rich.console import Console

        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
        raise typer.Exit(2) from err
