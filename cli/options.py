"""Shared CLI plumbing: options made from the config dataclasses, `--config FILE`, `--preset NAME`.

`config_options(ConfigClass)` gives a command one option per field of its config (name, type,
default and help from the field; see `segppo.config`), so the configs are the one source of the
options. `--config FILE` and `--preset NAME` feed click's `default_map`. Precedence, lowest
first: the field defaults, the preset, the YAML config file, explicit flags. Both options are
eager, so their values are in place before any other option is read.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from segppo.config import load_config_file
from segppo.config_fields import RUN, takes_json_object
from segppo.presets import preset_values
from segppo.run_log import library_warnings_to


def config_options(config_cls: type, presets: dict[str, dict[str, Any]] | None = None):
    """Decorate a command `fn(values, **own)`: its CLI options are the fields of `config_cls`
    (then `fn`'s own parameters after `values`, `--config` and, with `presets`, `--preset`).

    `fn` is called with `values`, the field values by name (`build_config(config_cls, values)`
    makes the config; a command may look at a value first, as `--list-keys` does), and its own
    options as keywords.
    """
    hints = typing.get_type_hints(config_cls)
    fields = dataclasses.fields(config_cls)

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        ]
        params = [_field_parameter(f, hints[f.name]) for f in fields]
        params += own
        params.append(_keyword("config", Annotated[str | None, config_option(config_cls)]))
        if presets is not None:
            params.append(_keyword("preset", Annotated[str | None, preset_option(presets)]))
        names = {f.name for f in fields}

        @functools.wraps(fn)
        def command(**given: Any) -> None:
            values = {k: v for k, v in given.items() if k in names}
            fn(values, **{p.name: given[p.name] for p in own})

        command.config_class = config_cls  # what `--help` and its tests read the panels of
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # Typer must read the signature above, not fn's
        return command

    return decorate


def _field_parameter(f: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    # The field's panel is its option's `--help` panel (`segppo.cli.help`); a plain field has none.
    info = dict(help=f.metadata.get("help"), rich_help_panel=f.metadata.get("panel"))
    if takes_json_object(annotation):
        # Typer has no dict type: JSON text from the command line and a mapping from a YAML config
        # reach the config as given, which parses and checks both (`parse_json_objects`).
        info.update(parser=_as_given, metavar="<json>")
    argument = f.metadata.get("argument")
    option = typer.Argument(metavar=argument, **info) if argument else typer.Option(**info)
    default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
    return _keyword(f.name, Annotated[annotation, option], default)


def _as_given(value: Any) -> Any:
    return value


def _keyword(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


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

    reads_others = hasattr(config_cls, "config_file_values")  # `load_config_file`
    also = "; a training command's file too (its data options)" if reads_others else ""
    return typer.Option(
        "--config",
        help=f"YAML file whose keys are option names{also}; explicit flags win.",
        rich_help_panel=RUN,
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
        rich_help_panel=RUN,
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


# Errors that describe bad input: shown as one clear line, not a traceback (exit status 2).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


def _run_errors() -> tuple[type[BaseException], ...]:
    """Errors that stop a run for a reason their message states in full (one line, exit status 1):
    non-finite values (`NonFiniteError`), a disk too full for the next state, a spawned rank's
    failure (its traceback is in the run folder)."""
    from segppo.distributed import NoSpaceError, RankFailed

    return (FloatingPointError, NoSpaceError, RankFailed)


def run_or_exit(fn, log: Path | None = None):
    """Run `fn()`; a user error becomes a red one-line message and exit status 2, a run that stops
    for a stated reason one line and exit status 1. With `log` (the run's log file), warnings of
    the libraries go there instead of the screen (`segppo.run_log`), and a last line says so."""
    with library_warnings_to(log) as router:
        try:
            return fn()
        except USER_ERRORS as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            _print_error(message)
            raise typer.Exit(2) from err
        except Exception as err:
            if not isinstance(err, _run_errors()):
                raise
            _print_error(str(err))
            raise typer.Exit(1) from err
        finally:
            if router is not None and router.count:
                _print_note(f"{router.count} warning(s) of the libraries (not segppo's) are in {router.log}")


def _print_note(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(message, style="dim", markup=False, highlight=False)


def _print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: one line however narrow the terminal (a log reader greps it whole); escaped, so that
    # brackets in a message (a path, a rank's "[rank1]:") print as they are.
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
