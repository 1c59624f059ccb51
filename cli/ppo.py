"""`segppo ppo train`."""

from __future__ import annotations

from typing import Annotated

import typer

from segppo.config import PPO_PRESETS, PPOConfig

from .options import build_config, config_option, preset_option, run_or_exit

app = typer.Typer(help="PPO with segment-, token- or bandit-level rewards.", no_args_is_help=True)
Opt = typer.Option


@app.command("train")
def train(
    policy: Annotated[str, Opt(help="SFT model: the initial policy (and the default reference).")],
    reward_model: Annotated[str, Opt(help="Reward model folder (or run folder) or hub name.")],
    prompts: Annotated[str, Opt(help="Prompt data: hub name, file or folder (strings or message lists).")],
    output: Annotated[str, Opt(help="Run folder (policy/, state/, metrics.jsonl, samples.jsonl).")],
    reference: Annotated[
        str | None, Opt(help="Frozen reference for KL and entropy (default: --policy).")
    ] = None,
    critic_init: Annotated[str, Opt(help="rm | sft: where the critic starts.")] = "rm",
    split: Annotated[str, Opt()] = "train",
    max_samples: Annotated[int | None, Opt(help="Use at most this many prompts.")] = None,
    prompt_key: Annotated[str | None, Opt(help="Column of the prompt (overrides detection).")] = None,
    chat_template: Annotated[
        str | None, Opt(help="Jinja template (default: the one the RM was trained with).")
    ] = None,
    max_prompt_len: Annotated[int, Opt()] = 1024,
    long_prompts: Annotated[str, Opt(help="error | truncate: prompts over --max-prompt-len.")] = "error",
    max_new_tokens: Annotated[int, Opt(help="Generation limit per response.")] = 1024,
    temperature: Annotated[float, Opt()] = 1.0,
    top_p: Annotated[float, Opt()] = 1.0,
    stop_token: Annotated[list[str] | None, Opt(help="Extra stop token (repeatable).")] = None,
    reward_granularity: Annotated[
        str | None, Opt(help="segment | token | bandit (default: the RM's).")
    ] = None,
    entropy_threshold: Annotated[
        float | None, Opt(help="Segmentation threshold (default: the RM's).")
    ] = None,
    distribute: Annotated[str, Opt(help="interpolate | repeat | end: a segment's reward on its tokens.")] = (
        "interpolate"
    ),
    normalizer: Annotated[str | None, Opt(help="normalizer.json (default: the RM's own, if any).")] = None,
    normalize: Annotated[bool, Opt(help="Location-aware normalization of segment rewards.")] = True,
    reward_mean: Annotated[float | None, Opt(help="Bandit normalizer mean.")] = None,
    reward_std: Annotated[float | None, Opt(help="Bandit normalizer std.")] = None,
    sigma_floor: Annotated[float | None, Opt(help="Floor of σ(p) (default: the normalizer's own).")] = None,
    reward_clip: Annotated[float, Opt()] = 10.0,
    kl_coef: Annotated[float, Opt(help="β of the KL penalty (initial value when adaptive).")] = 0.01,
    kl_target: Annotated[float | None, Opt(help="Adaptive KL control towards this KL.")] = None,
    kl_horizon: Annotated[int, Opt()] = 10000,
    kl_estimator: Annotated[str, Opt(help="k1 | k3.")] = "k1",
    missing_eos_penalty: Annotated[float | None, Opt(help="Added at the last token without EOS.")] = None,
    overlong_penalty: Annotated[
        float | None, Opt(help="Added when a response exceeds --max-response-len.")
    ] = None,
    max_response_len: Annotated[int | None, Opt()] = None,
    gamma: Annotated[float, Opt()] = 1.0,
    lam: Annotated[float, Opt()] = 0.95,
    policy_clip: Annotated[float, Opt()] = 0.2,
    value_clip: Annotated[float | None, Opt(help="Default 0.25 dense, 0.2 bandit.")] = None,
    whiten_advantages: Annotated[bool, Opt()] = True,
    rollout_batch_size: Annotated[int, Opt(help="Prompts per rollout over all ranks.")] = 1024,
    micro_rollout_batch_size: Annotated[int, Opt(help="Prompts per generate call on one rank.")] = 16,
    train_batch_size: Annotated[int, Opt(help="Samples per optimizer step over all ranks.")] = 128,
    micro_train_batch_size: Annotated[int, Opt()] = 4,
    ppo_epochs: Annotated[int, Opt()] = 1,
    num_episodes: Annotated[int, Opt(help="Passes over the prompt set.")] = 1,
    max_steps: Annotated[int | None, Opt(help="Stop after this many rollout/update rounds.")] = None,
    actor_lr: Annotated[float, Opt()] = 5e-7,
    critic_lr: Annotated[float, Opt()] = 9e-6,
    warmup_ratio: Annotated[float, Opt()] = 0.03,
    min_lr_ratio: Annotated[float, Opt()] = 0.1,
    weight_decay: Annotated[float, Opt()] = 0.0,
    grad_clip: Annotated[float, Opt()] = 1.0,
    zero_stage: Annotated[int, Opt()] = 2,
    bf16: Annotated[bool, Opt()] = False,
    gradient_checkpointing: Annotated[bool, Opt()] = False,
    save_every: Annotated[int, Opt(help="Checkpoint every N steps (0: at the end only).")] = 0,
    num_logged_samples: Annotated[int, Opt(help="Generations per step written to samples.jsonl.")] = 4,
    seed: Annotated[int, Opt()] = 42,
    nproc: Annotated[int, Opt(help="Local ranks to run (DeepSpeed).")] = 1,
    resume: Annotated[bool, Opt(help="Continue the run in --output from its last state.")] = False,
    trust_remote_code: Annotated[bool, Opt()] = False,
    tensorboard: Annotated[bool, Opt()] = False,
    wandb_project: Annotated[str | None, Opt()] = None,
    config: Annotated[str | None, config_option(PPOConfig)] = None,
    preset: Annotated[str | None, preset_option(PPO_PRESETS)] = None,
) -> None:
    """Train a policy with PPO against the reward model's dense (or bandit) rewards."""
    from segppo.ppo.trainer import train_ppo

    values = {k: v for k, v in locals().items() if k not in ("config", "preset", "train_ppo")}
    cfg = build_config(PPOConfig, values)
    run_or_exit(lambda: train_ppo(cfg))
