"""`segppo fit-normalizer`: fit (or import) the location-aware normalizer of a reward model."""

from __future__ import annotations

import warnings
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from segppo.config import FitNormalizerConfig
from segppo.config_fields import NORMALIZER_FIT
from segppo.presets import FIT_NORMALIZER_PRESETS

from .options import build_config, config_options, run_or_exit
from .tables import print_table

console = Console()

Opt = typer.Option


@config_options(FitNormalizerConfig, FIT_NORMALIZER_PRESETS)
def fit_normalizer(
    values: dict[str, Any],
    list_keys: Annotated[
        bool, Opt(help="List the entries of --from-param-json and exit.", rich_help_panel=NORMALIZER_FIT)
    ] = False,
) -> None:
    """Fit the location-aware normalizer of a reward model, or import the paper's param.json.

    Scores every segment of the chosen and rejected responses of --samples preference pairs with
    the reward model and its segmenter, fits the mean and std of the scores against ln(k/K), and
    writes normalizer.json for PPO.
    """
    from segppo.normalizer import StdFloorWarning, curve_sketch, fit_table, normalizer_file, param_json_keys

    if list_keys:
        if values["from_param_json"] is None:
            raise typer.BadParameter("--list-keys lists the entries of --from-param-json FILE")
        for name in run_or_exit(lambda: param_json_keys(values["from_param_json"])):
            typer.echo(name)
        return

    from segppo.fit_normalizer import run_fit_normalizer

    cfg = build_config(FitNormalizerConfig, values)
    target = normalizer_file(cfg.output)  # --output may name a folder: normalizer.json goes inside
    with warnings.catch_warnings():  # the table shows a std-floor warning in its own row
        warnings.simplefilter("ignore", StdFloorWarning)
        # the run's log sits beside normalizer.json: normalizer.log
        normalizer = run_or_exit(lambda: run_fit_normalizer(cfg), log=target.with_suffix(".log"))
    print_table(console, fit_table(normalizer))
    if normalizer.bins:
        console.print(Text(curve_sketch(normalizer)))
    params = ", ".join(f"{x:.6g}" for x in normalizer.params)
    console.print(f"[a, b, c, d] = [{params}] → {target}", markup=False, highlight=False)
