"""A PPO run's state (to resume) and its policy export (to use)."""

from __future__ import annotations

from pathlib import Path

import torch

from segppo.config import PPOConfig
from segppo.data import ChatFormat
from segppo.distributed import full_state_dict, latest_state, load_training_state, save_training_state
from segppo.io import as_recorded
from segppo.models import SegppoMetadata, save_policy
from segppo.ppo.advantages import needs_critic
from segppo.ppo.losses import KLController
from segppo.ppo.rollout import RewardShaping
from segppo.state import check_resumed_options


def trained_engines(models) -> dict:
    """The DeepSpeed engines a state holds: the actor, and the critic when the estimator has one."""
    return {"actor": models.actor} | ({"critic": models.critic} if models.critic is not None else {})


# What a resumed run keeps: a step's prompts are found from its number, the prompt order (--seed) and
# the rollout size (`PPOTrainer.generate`); other values would repeat some prompts and skip others.
# The prompts themselves may change: a run stopped by a bad prompt resumes on a repaired copy.
RESUMED_AS_STARTED = ("seed", "max_samples", "rollout_batch_size", "n_samples_per_prompt")


def check_resume_options(cfg: PPOConfig) -> None:
    """A resume keeps the prompts and their order (`RESUMED_AS_STARTED`) and the options that decide
    the state's models (`check_resumed_options`): here also whether there is a critic (`--advantage
    gae` or a critic-free estimator)."""

    def critic_changed(started: dict) -> list[str]:
        advantage = started.get("advantage", "gae")
        return [f"--advantage {advantage}"] if needs_critic(advantage) != needs_critic(cfg.advantage) else []

    check_resumed_options(cfg, RESUMED_AS_STARTED, changed_since=critic_changed)


def save_state(cfg: PPOConfig, models, kl_ctl: KLController, step: int) -> None:
    """Actor, critic (DeepSpeed: weights, optimizer, schedule, RNG) and the KL controller after `step`."""
    save_training_state(
        trained_engines(models),
        cfg.output_dir / "state",
        f"step-{step}",
        {"step": step, "kl": kl_ctl.state_dict()},
        keep=cfg.save_total_limit,
    )


def load_state(cfg: PPOConfig, models, kl_ctl: KLController) -> int:
    """Restore the latest state; returns the number of steps it has done."""
    state = load_training_state(trained_engines(models), latest_state(cfg.output_dir / "state"))
    kl_ctl.load_state_dict(state["kl"])
    return int(state["step"])


def export_policy(
    cfg: PPOConfig,
    actor,
    tokenizer,
    chat: ChatFormat,
    shaping: RewardShaping,
    folder: Path,
    *,
    steps: int,
    is_main: bool,
) -> None:
    """The policy as a Hugging Face folder loadable with AutoModelForCausalLM, with its segppo.json
    (the chat format the policy was trained in: template, stop ids, end of turn). A LoRA actor is
    merged into its base weights, or with `--lora-export adapter` saved as its adapter alone."""
    state = full_state_dict(actor)
    if is_main:
        seg = shaping.segmentation
        meta = SegppoMetadata(
            kind="policy",
            granularity=seg.granularity,
            # Only segment rewards have a threshold and take entropy from a segmenter (the reference).
            threshold=seg.threshold if seg.needs_entropy else None,
            segmenter=as_recorded(cfg.reference or cfg.policy) if seg.needs_entropy else None,
            **chat.metadata_fields(),  # template, stop ids, end of turn: what eval and PPO read back
            base_model=as_recorded(cfg.policy),
            normalizer={"params": list(shaping.normalizer), "sigma_floor": shaping.sigma_floor}
            if shaping.normalizer
            else None,
            data={
                "prompts": as_recorded(cfg.prompts),
                "split": cfg.split,
                "reward_model": as_recorded(cfg.reward_model),
                "steps": steps,
            },
        )
        save_policy(actor.module, tokenizer, folder, meta, state_dict=state, lora_export=cfg.lora_export)
    torch.distributed.barrier()
