"""`segppo fit-normalizer`: fit (or import) the location-aware normalizer of a reward model."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from segppo.config import FitNormalizerConfig

from .options import build_config, config_option, run_or_exit

console = Console()

Opt = typer.Option


def fit_normalizer(
    reward_model: Annotated[
        str | None, Opt(help="Reward model folder (or run folder) or hub name to fit.")
    ] = None,
    dataset: Annotated[str | None, Opt(help="Preference data whose responses are scored.")] = None,
    output: Annotated[str, Opt(help="Where to write normalizer.json.")] = "normalizer.json",
    samples: Annotated[int, Opt(help="Preference pairs to score (chosen and rejected responses).")] = 60000,
    split: Annotated[str, Opt()] = "train",
    seed: Annotated[int, Opt(help="Seed of the shuffle that picks the pairs.")] = 42,
    prompt_key: Annotated[str | None, Opt(help="Column of the prompt (overrides detection).")] = None,
    chosen_key: Annotated[str | None, Opt()] = None,
    rejected_key: Annotated[str | None, Opt()] = None,
    max_len: Annotated[int, Opt(help="Prompt + response tokens.")] = 2048,
    max_prompt_len: Annotated[int, Opt()] = 1728,
    batch_size: Annotated[int, Opt(help="Pairs per forward on one rank.")] = 8,
    min_bin_count: Annotated[int, Opt(help="Bins with fewer scores are left out of the fit.")] = 10,
    sigma_floor: Annotated[float, Opt(help="Lower bound of the fitted std.")] = 1e-2,
    plot: Annotated[str | None, Opt(help="Also save a PNG of the fit (needs matplotlib).")] = None,
    into_rm: Annotated[
        bool, Opt(help="Also write the normalizer into the reward model folder's segppo.json.")
    ] = False,
    segmenter: Annotated[str | None, Opt(help="Override the segmenter recorded in segppo.json.")] = None,
    granularity: Annotated[str | None, Opt(help="For imported RMs that record none.")] = None,
    threshold: Annotated[float | None, Opt(help="Entropy threshold, with --granularity segment.")] = None,
    bf16: Annotated[bool, Opt(help="Run the models in bfloat16.")] = False,
    nproc: Annotated[int, Opt(help="Local ranks to split the samples across.")] = 1,
    trust_remote_code: Annotated[bool, Opt(help="Allow model code from the hub (off by default).")] = False,
    from_param_json: Annotated[
        str | None, Opt(help="Import the paper's param.json instead of fitting.")
    ] = None,
    key: Annotated[
        str | None, Opt(help="Entry of --from-param-json: model/dataset/method/agg/threshold.")
    ] = None,
    list_keys: Annotated[bool, Opt(help="List the entries of --from-param-json and exit.")] = False,
    config: Annotated[str | None, config_option(FitNormalizerConfig)] = None,
) -> None:
    """Fit the location-aware normalizer of a reward model, or import the paper's param.json.

    Scores every segment of the chosen and rejected responses of --samples preference pairs with
    the reward model and its segmenter, fits the mean and std of the scores against ln(k/K), and
    writes normalizer.json for PPO.
    """
    given = dict(locals())
    values = {f.name: given[f.name] for f in dataclasses.fields(FitNormalizerConfig)}
    from segppo.normalizer import StdFloorWarning, curve_sketch, fit_table, param_json_keys

    if list_keys:
        if from_param_json is None:
            raise typer.BadParameter("--list-keys lists the entries of --from-param-json FILE")
        for name in run_or_exit(lambda: param_json_keys(from_param_json)):
            typer.echo(name)
        return

    from segppo.fit_normalizer import run_fit_normalizer

    cfg = build_config(FitNormalizerConfig, values)
    with warnings.catch_warnings():  # the table shows a std-floor warning in its own row
        warnings.simplefilter("ignore", StdFloorWarning)
        normalizer = run_or_exit(lambda: run_fit_normalizer(cfg))
    console.print(fit_table(normalizer))
    if normalizer.bins:
        console.print(Text(curve_sketch(normalizer)))
    params = ", ".join(f"{x:.6g}" for x in normalizer.params)
    console.print(f"[a, b, c, d] = [{params}] → {output}", markup=False, highlight=False)
