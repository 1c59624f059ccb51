"""`segppo eval`: compare policies on a prompt set with a reward model or a Python scorer."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from segppo.config import EvalConfig

from .options import build_config, config_option, run_or_exit

Opt = typer.Option


def eval_command(
    policy: Annotated[
        list[str], Opt(help="Policy folder, PPO run folder or hub name; repeat to compare several.")
    ],
    prompts: Annotated[
        str,
        Opt(
            help="Prompt data: PPO's layouts, MT-Bench/Arena-Hard question.jsonl (`turns`) "
            "or AlpacaEval (`instruction`) rows."
        ),
    ],
    output: Annotated[
        str, Opt(help="Folder for results.json, responses/, the benchmark exports and the plot.")
    ],
    reward_model: Annotated[
        str | None, Opt(help="Score with this reward model (its sequence score and PPO-normalized reward).")
    ] = None,
    scorer: Annotated[
        str | None, Opt(help="Score with a Python callable module:function, f(prompts, responses) -> scores.")
    ] = None,
    baseline: Annotated[
        str | None,
        Opt(
            help="Policy to compute win rates against: a --name, a --policy, or another policy path "
            "(default: the first)."
        ),
    ] = None,
    name: Annotated[
        list[str] | None, Opt(help="Name of each --policy, in order (default: the folder's last component).")
    ] = None,
    num_samples: Annotated[int, Opt(help="Responses per prompt per policy.")] = 1,
    turns: Annotated[int, Opt(help="1, or 2 for MT-Bench-style two-turn prompts.")] = 1,
    split: Annotated[str, Opt()] = "train",
    max_samples: Annotated[int | None, Opt(help="Use at most this many prompts.")] = None,
    prompt_key: Annotated[str | None, Opt(help="Column of the prompt (overrides detection).")] = None,
    chat_template: Annotated[
        str | None, Opt(help="Jinja template (default: the RM's when it shares the policy's tokenizer).")
    ] = None,
    max_prompt_len: Annotated[int, Opt()] = 1024,
    long_prompts: Annotated[str, Opt(help="error | truncate: prompts over --max-prompt-len.")] = "error",
    max_new_tokens: Annotated[int, Opt(help="Generation limit per response (per turn).")] = 1024,
    temperature: Annotated[float, Opt()] = 1.0,
    top_p: Annotated[float, Opt()] = 1.0,
    stop_token: Annotated[list[str] | None, Opt(help="Extra stop token (repeatable).")] = None,
    batch_size: Annotated[int, Opt(help="Prompts per generate call and responses per scoring forward.")] = 16,
    seed: Annotated[int, Opt(help="Sampling seed; every policy draws the same numbers per prompt.")] = 42,
    normalizer: Annotated[str | None, Opt(help="normalizer.json (default: the RM's own, if any).")] = None,
    sigma_floor: Annotated[float | None, Opt(help="Normalizer σ floor (default: the normalizer's).")] = None,
    segmenter: Annotated[str | None, Opt(help="Override the RM's recorded segmenter.")] = None,
    granularity: Annotated[str | None, Opt(help="For imported RMs that record none.")] = None,
    threshold: Annotated[float | None, Opt()] = None,
    bf16: Annotated[bool, Opt(help="Load policies and RM in bfloat16.")] = False,
    plot: Annotated[bool, Opt(help="Write score_distributions.png (needs matplotlib).")] = True,
    trust_remote_code: Annotated[bool, Opt()] = False,
    as_json: Annotated[bool, Opt("--json", help="Print results.json instead of a table.")] = False,
    config: Annotated[str | None, config_option(EvalConfig)] = None,
) -> None:
    """Generate with each policy, score with a reward model or a Python function, compare with the
    baseline (win rates, ties half), and export AlpacaEval / Arena-Hard / MT-Bench answer files."""
    from segppo.eval import evaluate

    values = {k: v for k, v in locals().items() if k not in ("as_json", "config", "evaluate")}
    cfg = build_config(EvalConfig, values)
    results = run_or_exit(lambda: evaluate(cfg, progress=not as_json))
    if as_json:
        typer.echo(json.dumps(results.to_dict(), indent=2))
        return
    console = Console()
    console.print(results.table())
    for note in results.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"results: {results.results_file}", highlight=False)
