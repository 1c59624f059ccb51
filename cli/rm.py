"""`segppo rm train|eval|inspect`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from segppo.config import RM_PRESETS, RMConfig, RMEvalConfig

from .options import build_config, config_option, preset_option, run_or_exit

app = typer.Typer(help="Train, evaluate and inspect reward models.", no_args_is_help=True)
console = Console()

Opt = typer.Option


@app.command("train")
def train(
    model: Annotated[str, Opt(help="Backbone the RM starts from: a causal LM (hub name or folder).")],
    dataset: Annotated[str, Opt(help="Preference data: hub name, .json/.jsonl/.parquet file or folder.")],
    output: Annotated[str, Opt(help="Run folder (model/, state/, metrics.jsonl).")],
    granularity: Annotated[str, Opt(help="segment | token | bandit.")] = "segment",
    entropy_threshold: Annotated[
        float, Opt(help="Segment ends where the segmenter's entropy exceeds this.")
    ] = 2.0,
    segmenter: Annotated[str | None, Opt(help="Entropy model (default: --model).")] = None,
    split: Annotated[str, Opt(help="Training split.")] = "train",
    eval_split: Annotated[
        str | None, Opt(help="Evaluation split (default: the dataset's own, else held out).")
    ] = None,
    eval_fraction: Annotated[float, Opt(help="Fraction held out when the dataset has no eval split.")] = 0.02,
    max_samples: Annotated[int | None, Opt(help="Use at most this many training rows.")] = None,
    prompt_key: Annotated[str | None, Opt(help="Column of the prompt (overrides detection).")] = None,
    chosen_key: Annotated[str | None, Opt(help="Column of the chosen response.")] = None,
    rejected_key: Annotated[str | None, Opt(help="Column of the rejected response.")] = None,
    chat_template: Annotated[str | None, Opt(help="Jinja chat template (string or file).")] = None,
    max_len: Annotated[int, Opt(help="Prompt + response tokens.")] = 2048,
    max_prompt_len: Annotated[int, Opt(help="Prompt tokens (truncated from the left first).")] = 1728,
    epochs: Annotated[int, Opt()] = 1,
    max_steps: Annotated[int | None, Opt(help="Stop after this many optimizer steps.")] = None,
    lr: Annotated[float, Opt(help="Peak learning rate.")] = 1e-6,
    warmup_ratio: Annotated[float, Opt()] = 0.03,
    min_lr_ratio: Annotated[float, Opt(help="Cosine floor as a fraction of --lr.")] = 0.1,
    weight_decay: Annotated[float, Opt()] = 0.0,
    grad_clip: Annotated[float, Opt()] = 1.0,
    batch_size: Annotated[int, Opt(help="Pairs per optimizer step over all ranks.")] = 128,
    micro_batch_size: Annotated[int, Opt(help="Pairs per forward on one rank.")] = 8,
    margin: Annotated[bool, Opt(help="Use the data's score margins in the loss.")] = False,
    zero_stage: Annotated[int, Opt(help="DeepSpeed ZeRO stage 0-3.")] = 2,
    bf16: Annotated[bool, Opt(help="Train in bfloat16.")] = False,
    gradient_checkpointing: Annotated[bool, Opt()] = False,
    eval_every: Annotated[int, Opt(help="Evaluate every N steps (0: at the end only).")] = 0,
    save_every: Annotated[int, Opt(help="Checkpoint every N steps (0: at the end only).")] = 0,
    seed: Annotated[int, Opt()] = 42,
    nproc: Annotated[int, Opt(help="Local ranks to run (DeepSpeed).")] = 1,
    resume: Annotated[bool, Opt(help="Continue the run in --output from its last state.")] = False,
    trust_remote_code: Annotated[bool, Opt(help="Allow model code from the hub (off by default).")] = False,
    tensorboard: Annotated[bool, Opt()] = False,
    wandb_project: Annotated[str | None, Opt()] = None,
    config: Annotated[str | None, config_option(RMConfig)] = None,
    preset: Annotated[str | None, preset_option(RM_PRESETS)] = None,
) -> None:
    """Train a segment-, token- or bandit-level reward model on preference pairs."""
    from segppo.rm.trainer import train_reward_model

    values = {k: v for k, v in locals().items() if k not in ("config", "preset", "train_reward_model")}
    cfg = build_config(RMConfig, values)
    run_or_exit(lambda: train_reward_model(cfg))


@app.command("eval")
def evaluate(
    model: Annotated[str, Opt(help="Reward model folder (or run folder) or hub name.")],
    dataset: Annotated[str, Opt(help="Preference data.")],
    split: Annotated[str, Opt()] = "train",
    max_samples: Annotated[int | None, Opt()] = None,
    prompt_key: Annotated[str | None, Opt()] = None,
    chosen_key: Annotated[str | None, Opt()] = None,
    rejected_key: Annotated[str | None, Opt()] = None,
    max_len: Annotated[int, Opt()] = 2048,
    max_prompt_len: Annotated[int, Opt()] = 1728,
    batch_size: Annotated[int, Opt(help="Pairs per forward.")] = 8,
    segmenter: Annotated[str | None, Opt(help="Override the segmenter recorded in segppo.json.")] = None,
    granularity: Annotated[str | None, Opt(help="For imported RMs that record none.")] = None,
    threshold: Annotated[float | None, Opt()] = None,
    trust_remote_code: Annotated[bool, Opt()] = False,
    as_json: Annotated[bool, Opt("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Pairwise accuracy and score statistics of a reward model (never on its training rows)."""
    from segppo.rm.evaluate import evaluate_reward_model

    values = {k: v for k, v in locals().items() if k not in ("as_json", "evaluate_reward_model")}
    cfg = build_config(RMEvalConfig, values)
    stats = run_or_exit(lambda: evaluate_reward_model(cfg))
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    table = Table(title=f"reward model {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def _reward_style(value: float, scale: float) -> str:
    """Red for negative, green for positive rewards, brighter when larger."""
    level = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    channel = int(80 + 175 * level)
    return f"on rgb({channel},40,40)" if value < 0 else f"on rgb(40,{channel},40)"


@app.command("inspect")
def inspect(
    model: Annotated[str, Opt(help="Reward model folder (or run folder) or hub name.")],
    prompt: Annotated[str, Opt(help="The user prompt.")],
    response: Annotated[str, Opt(help="The assistant response to split and score.")],
    segmenter: Annotated[str | None, Opt(help="Override the segmenter recorded in segppo.json.")] = None,
    granularity: Annotated[str | None, Opt()] = None,
    threshold: Annotated[float | None, Opt()] = None,
    trust_remote_code: Annotated[bool, Opt()] = False,
) -> None:
    """Show a response split into the RM's segments, each coloured by its reward."""
    from segppo.rm.evaluate import inspect_response
    from segppo.rm.scoring import load_scorer

    def run():
        scorer = load_scorer(
            model,
            segmenter=segmenter,
            granularity=granularity,
            threshold=threshold,
            trust_remote_code=trust_remote_code,
        )
        return scorer, inspect_response(scorer, prompt, response)

    scorer, segments = run_or_exit(run)
    scale = max((abs(s.reward) for s in segments if s.index), default=1.0)
    text = Text()
    for seg in segments:
        text.append(seg.text, style=_reward_style(seg.reward, scale) if seg.index else "dim")
    seg_info = scorer.segmentation
    console.print(f"[bold]{seg_info.granularity}[/] segments (threshold {seg_info.threshold}):")
    console.print(text)
    table = Table()
    for column in ("k", "segment", "tokens", "reward", "normalized", "entropy at end"):
        table.add_column(column, justify="left" if column == "segment" else "right")
    for seg in segments:
        table.add_row(
            str(seg.index) if seg.index else "-",
            repr(seg.text),
            f"{seg.start}-{seg.end}",
            f"{seg.reward:.4f}" if seg.index else "",
            f"{seg.normalized:.4f}" if seg.normalized is not None else "",
            f"{seg.entropy_at_end:.3f}" if seg.index else "",
        )
    console.print(table)
