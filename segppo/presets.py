"""Presets that reproduce the paper's runs: option values by name, for `--preset NAME`.

Keys are config field names (`segppo.config`); a preset fills the command's defaults, and a
`--config` file and explicit flags win over it.
"""

from __future__ import annotations

from typing import Any

from segppo.kernels import GRANULARITIES

# The paper's reward models (train_seg_rm.sh of its public code, README commands): preference_700K,
# one epoch, global batch 128, lr 1e-6, ZeRO-3, bf16, gradient checkpointing.
_PAPER_RM = dict(
    dataset="hendrydong/preference_700K",
    epochs=1,
    batch_size=128,
    lr=1e-6,
    max_len=2048,
    max_prompt_len=1728,
    zero_stage=3,
    bf16=True,
    gradient_checkpointing=True,
)
_BACKBONES = {
    "phi3-mini": ("microsoft/Phi-3-mini-4k-instruct", 1.75, 8),
    "llama3-sft-8b": ("RLHFlow/LLaMA3-SFT-v2", 2.0, 4),
    "llama3.1-instruct-8b": ("meta-llama/Llama-3.1-8B-Instruct", 2.0, 4),
}


def _rm_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for name, (model, threshold, micro) in _BACKBONES.items():
        for granularity in GRANULARITIES:
            presets[f"{name}-{granularity}"] = dict(
                _PAPER_RM,
                model=model,
                granularity=granularity,
                entropy_threshold=threshold,
                micro_batch_size=micro,
            )
    return presets


RM_PRESETS: dict[str, dict[str, Any]] = _rm_presets()


# The paper's nine PPO runs (train_ppo_segment.sh and README commands of its public code):
# UltraFeedback prompts, rollout batch 1024, train batch 128, ZeRO-2, bf16, actor lr 5e-7,
# critic lr 9e-6, prompts and responses up to 1024 tokens, value clip 0.25 (dense) / 0.2 (bandit).
# Bandit runs normalize with the RM's global score mean/std; dense runs need a normalizer.json
# (`segppo fit-normalizer`, or the paper's param.json imported with --from-param-json).
_PAPER_PPO = dict(
    prompts="argilla/ultrafeedback-binarized-preferences-cleaned",
    max_samples=800000,
    rollout_batch_size=1024,
    train_batch_size=128,
    max_prompt_len=1024,
    max_new_tokens=1024,
    zero_stage=2,
    bf16=True,
    gradient_checkpointing=True,
    actor_lr=5e-7,
    critic_lr=9e-6,
    kl_coef=0.01,
    reward_clip=10.0,
    gamma=1.0,
    lam=0.95,
    loss_agg="seq-mean",  # the paper's code: each response's token mean, then the batch mean
)
_PPO_BACKBONES = {
    # name: (policy, RM hub prefix, episodes, micro train batch, micro rollout batch, bandit mean/std)
    "phi3-mini": (
        "microsoft/Phi-3-mini-4k-instruct",
        "yyqoni/Phi-3-mini-4k-instruct",
        2,
        4,
        16,
        (-0.51953125, 2.15625),
    ),
    "llama3-sft-8b": (
        "RLHFlow/LLaMA3-SFT-v2",
        "yyqoni/rlhflow-llama-3-sft-8b-v2",
        1,
        2,
        4,
        (-0.81640625, 2.953125),
    ),
    "llama3.1-instruct-8b": (
        "meta-llama/Llama-3.1-8B-Instruct",
        "yyqoni/meta-llama-3-1-instruct-8b",
        1,
        2,
        4,
        (-0.828125, 2.9375),
    ),
}


def _ppo_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for name, (policy, rm_prefix, episodes, micro_train, micro_rollout, _) in _PPO_BACKBONES.items():
        for granularity in GRANULARITIES:
            presets[f"{name}-{granularity}"] = dict(
                _PAPER_PPO,
                policy=policy,
                reward_model=f"{rm_prefix}-{granularity}-rm-700k",
                reward_granularity=granularity,
                num_episodes=episodes,
                micro_train_batch_size=micro_train,
                micro_rollout_batch_size=micro_rollout,
                value_clip=0.2 if granularity == "bandit" else 0.25,
            )
    for name, (*_, (mean, std)) in _PPO_BACKBONES.items():
        presets[f"{name}-bandit"].update(reward_mean=mean, reward_std=std)
    # The paper's Llama-3.1 segment RM is published under a slightly different name.
    presets["llama3.1-instruct-8b-segment"]["reward_model"] = (
        "yyqoni/meta-llama-3.1-instruct-8b-segment-rm-700k"
    )
    # The published Llama-3.1 segment run used an end-of-text penalty of -0.05 (encoded in its
    # experiment name in the paper's code; an explicit option here).
    presets["llama3.1-instruct-8b-segment"]["missing_eos_penalty"] = -0.05
    return presets


PPO_PRESETS: dict[str, dict[str, Any]] = _ppo_presets()


# The paper's normalizer fits (the `preference700k_60000` entries of its param.json): 60k pairs of
# preference_700K scored by each published dense RM, bins fitted unweighted (`fit_mode="paper"`).
FIT_NORMALIZER_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(
        reward_model=preset["reward_model"],
        dataset=_PAPER_RM["dataset"],
        samples=60000,
        fit_mode="paper",
        bf16=True,
    )
    for name, preset in PPO_PRESETS.items()
    if preset["reward_granularity"] != "bandit"
}


def preset_values(name: str, presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(presets))}")
    return dict(presets[name])


__all__ = ["FIT_NORMALIZER_PRESETS", "PPO_PRESETS", "RM_PRESETS", "preset_values"]
