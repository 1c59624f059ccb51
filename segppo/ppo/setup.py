"""Setting up a PPO run: the reward model and its reading, prompts, the four models.

Everything here runs once per run, before the first step; `segppo.ppo.trainer` then only steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from segppo.config import PPOConfig
from segppo.data import ChatFormat, EncodedPrompt, LayoutOptions, encode_prompts, load_rows
from segppo.distributed import DistInfo, frozen_on_device, loading_config
from segppo.io import same_source
from segppo.models import (
    SegppoMetadata,
    create_reward_model,
    disable_dropout,
    load_policy,
    load_reward_model,
    load_tokenizer,
)
from segppo.models.loading import same_model
from segppo.models.reward_model import run_model_folder
from segppo.models.zero3 import keep_partitioned_loading
from segppo.optim import training_engine
from segppo.ppo.advantages import needs_critic
from segppo.ppo.rollout import RewardShaping, foreign_bandit_rm_values, shared_rm_values
from segppo.rm.scoring import resolve_normalizer, same_vocabulary
from segppo.segments import Segmentation
from segppo.state import latest_state, zero_partitioned
from segppo.tracking import console


@dataclass
class RewardModelSpec:
    model: torch.nn.Module
    metadata: SegppoMetadata
    tokenizer: object
    shares_tokenizer: bool

    @property
    def segmentation(self) -> Segmentation:
        return Segmentation.resolve(self.metadata.granularity, self.metadata.threshold or 0.0)


def load_reward(cfg: PPOConfig, policy_tokenizer) -> RewardModelSpec:
    """The frozen reward model, checked against the policy's tokenizer (DESIGN.md §3.6); in the
    actor's dtype (DeepSpeed casts the actor to bf16), and under ZeRO-3 built partitioned."""
    model, metadata = load_reward_model(
        cfg.reward_model,
        dtype="bf16" if cfg.bf16 else "fp32",
        trust_remote_code=cfg.trust_remote_code,
        granularity=cfg.reward_granularity,
        threshold=cfg.entropy_threshold,
        ds_config=loading_config(zero_stage=cfg.zero_stage, bf16=cfg.bf16, offload=cfg.rm_offload),
    )
    folder = run_model_folder(Path(cfg.reward_model)) if Path(cfg.reward_model).is_dir() else cfg.reward_model
    tokenizer = load_tokenizer(folder, trust_remote_code=cfg.trust_remote_code)
    spec = RewardModelSpec(model, metadata, tokenizer, same_vocabulary(tokenizer, policy_tokenizer))
    if cfg.entropy_threshold is not None and metadata.granularity != "segment":
        # (A segment RM's threshold may be the paper's 0 or 1000, which mean token and bandit.)
        raise ValueError(
            f"--entropy-threshold {cfg.entropy_threshold} sets where segments end, but the rewards of "
            f"{cfg.reward_model} are {metadata.granularity}-level here; pass --reward-granularity segment "
            "to segment them, or drop --entropy-threshold"
        )
    granularity = spec.segmentation.granularity
    if not spec.shares_tokenizer and granularity != "bandit":
        raise ValueError(
            f"the {granularity}-level reward model {cfg.reward_model} uses a different tokenizer from the "
            f"policy {cfg.policy}; dense rewards are placed on the policy's tokens, so they must share one "
            "(only a bandit RM can be scored through its own tokenizer)"
        )
    disable_dropout(model)
    return spec


def reward_shaping(cfg: PPOConfig, reward: RewardModelSpec) -> RewardShaping:
    """How this run turns RM values into per-token rewards; warns when a dense RM has no normalizer."""
    segmentation = reward.segmentation
    choice = resolve_normalizer(
        reward.metadata,
        segmentation,
        normalize=cfg.normalize,
        normalizer=cfg.normalizer,
        reward_mean=cfg.reward_mean,
        reward_std=cfg.reward_std,
        sigma_floor=cfg.sigma_floor,
    )
    if cfg.normalize and choice.params is None and segmentation.granularity != "bandit":
        console.print(
            "[yellow]warning:[/] no normalizer for a dense reward model: segment rewards are used raw. "
            "Fit one with `segppo fit-normalizer` and pass --normalizer (or --no-normalize to silence this)."
        )
    return RewardShaping(
        segmentation=segmentation,
        normalizer=choice.params,
        sigma_floor=choice.sigma_floor,
        distribute=cfg.distribute,
        reward_clip=cfg.reward_clip,
        kl_estimator=cfg.kl_estimator,
        missing_eos_penalty=cfg.missing_eos_penalty,
        overlong_penalty=cfg.overlong_penalty,
        max_response_len=cfg.max_response_len,
    )


def warn_on_segmenter_mismatch(cfg: PPOConfig, reward: RewardModelSpec) -> None:
    meta = reward.metadata
    reference_name = cfg.reference or cfg.policy
    if (
        reward.segmentation.needs_entropy
        and meta.segmenter
        and not same_model(meta.segmenter, reference_name)  # a copy of the segmenter is the segmenter
    ):
        console.print(
            f"[yellow]warning:[/] the reward model was segmented with {meta.segmenter}, but PPO takes "
            f"entropy from the reference {reference_name}; segments may differ from the RM's training"
        )


def resolve_chat_template(cfg: PPOConfig, reward: RewardModelSpec) -> str | None:
    """PPO formats prompts as the RM was trained, so the RM reads the same text (DESIGN.md §3.6)."""
    recorded = reward.metadata.chat_template
    if not reward.shares_tokenizer:
        return cfg.chat_template
    if cfg.chat_template and recorded and cfg.chat_template != recorded:
        template = (
            Path(cfg.chat_template).read_text() if Path(cfg.chat_template).is_file() else cfg.chat_template
        )
        if template != recorded:
            raise ValueError(
                "--chat-template differs from the template the reward model was trained with (segppo.json); "
                "the RM would read PPO's responses in another format than its training data"
            )
    return cfg.chat_template or recorded


def resolve_chat_template_kwargs(cfg: PPOConfig, reward: RewardModelSpec) -> dict | None:
    """`--chat-template-kwargs`, held to the RM's recorded ones as the template is (DESIGN.md §3.6):
    with a shared tokenizer, other variables are refused, and None leaves the recorded ones to
    `policy_chat_format`; a foreign bandit RM reads text, so the policy's are the option's."""
    recorded = reward.metadata.chat_template_kwargs
    if not reward.shares_tokenizer or cfg.chat_template_kwargs is None:
        return cfg.chat_template_kwargs
    if (cfg.chat_template_kwargs or None) != (recorded or None):
        raise ValueError(
            f"--chat-template-kwargs {json.dumps(cfg.chat_template_kwargs)} differ from the ones the reward "
            f"model was trained with ({json.dumps(recorded) if recorded else 'none'}, segppo.json); the RM "
            "would read PPO's prompts in another format than its training data"
        )
    return cfg.chat_template_kwargs


def policy_chat_format(
    reward: RewardModelSpec, tokenizer, template: str | None, template_kwargs: dict | None = None
) -> ChatFormat:
    """The policy's chat format: with a shared tokenizer, the RM's recorded stop ids and end of turn
    (segppo.json), so PPO's responses end where the RM's training responses ended, and its template
    variables unless `template_kwargs` are given; a foreign bandit RM's stop ids are ids of another
    vocabulary, so the policy's own tokenizer decides them."""
    if reward.shares_tokenizer:
        return ChatFormat.from_metadata(
            tokenizer, reward.metadata, chat_template=template, template_kwargs=template_kwargs
        )
    return ChatFormat(tokenizer, template, template_kwargs=template_kwargs)


def load_prompts(cfg: PPOConfig, chat: ChatFormat) -> list[EncodedPrompt]:
    """The prompt set, encoded; a malformed row is skipped and counted in the report rank 0 prints
    (with `--strict`, an error naming the first one)."""
    rows = load_rows(cfg.prompts, split=cfg.split, max_samples=cfg.max_samples)
    prompts, report = encode_prompts(
        rows,
        chat.tokenizer,
        LayoutOptions(prompt_key=cfg.prompt_key, strict=cfg.strict),
        max_prompt_len=cfg.max_prompt_len,
        on_long_prompt=cfg.long_prompts,
        chat_template=chat.template,
        stop_token_ids=chat.stop_token_ids,
        template_kwargs=chat.template_kwargs,
    )
    if not prompts:
        raise ValueError(f"{cfg.prompts}: the prompt set is empty ({report})")
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        console.print(f"[bold]prompts[/] {report}")
    return prompts


def check_reference_tokenizer(cfg: PPOConfig, policy_tokenizer) -> None:
    """The KL compares the policy's and the reference's log-probs of the same token ids."""
    if cfg.reference and not same_source(cfg.reference, cfg.policy):
        reference = load_tokenizer(cfg.reference, trust_remote_code=cfg.trust_remote_code)
        if not same_vocabulary(reference, policy_tokenizer):
            raise ValueError(
                f"--reference {cfg.reference} uses a different tokenizer from the policy {cfg.policy}; "
                "the KL and the segmentation entropy are read on the policy's token ids"
            )


@dataclass
class Models:
    """Actor and critic train under DeepSpeed; reference and RM are frozen."""

    actor: object
    actor_sched: object
    critic: object | None  # None for a critic-free estimator
    critic_sched: object | None
    reference: torch.nn.Module  # under LoRA the actor's own base (`AdapterFreeView`)
    rm_values_fn: Callable  # batch -> [B, T] the RM's per-token values on the response
    zero3: object | None = None  # under ZeRO-3 transformers knows the models are partitioned while held


def load_models(
    cfg: PPOConfig,
    info: DistInfo,
    reward: RewardModelSpec,
    chat: ChatFormat,
    *,
    total_updates: int,
    grad_accum: int,
    prompt_messages: Callable,
) -> Models:
    """`chat`: the policy's chat format; `prompt_messages(batch)`: the prompt messages of each row
    (both for an RM with its own tokenizer)."""
    meta = reward.metadata
    check_reference_tokenizer(cfg, chat.tokenizer)
    dtype = "bf16" if cfg.bf16 else "fp32"
    built = loading_config(zero_stage=cfg.zero_stage, bf16=cfg.bf16)  # what ZeRO-3 builds models with
    zero3 = keep_partitioned_loading(built)
    kw = dict(trust_remote_code=cfg.trust_remote_code, ds_config=built)
    actor = load_policy(cfg.policy, gradient_checkpointing=cfg.gradient_checkpointing, **kw)
    if not needs_critic(cfg.advantage):
        critic = None  # rloo/grpo/reinforce++: no value model is built, trained or saved
    elif cfg.critic_init == "rm":
        if not reward.shares_tokenizer:
            raise ValueError("--critic-init rm needs an RM that shares the policy's tokenizer; use sft")
        critic, _ = load_reward_model(
            cfg.reward_model,
            gradient_checkpointing=cfg.gradient_checkpointing,
            granularity=meta.granularity,
            threshold=meta.threshold,
            **kw,
        )
    else:
        critic = create_reward_model(cfg.policy, gradient_checkpointing=cfg.gradient_checkpointing, **kw)
    for model in (actor, critic):
        if model is not None:
            disable_dropout(model)
    # Under LoRA the reference is the actor's base with the adapters off: no second copy.
    base_reference = cfg.lora_rank and (cfg.reference is None or same_source(cfg.reference, cfg.policy))
    if cfg.lora_rank:
        from segppo.models.lora import apply_lora

        lora = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        merge = cfg.lora_export == "merged"  # an adapter that cannot be merged fails now, not at the end
        actor = apply_lora(actor, *lora, merge=merge)
        # The value head trains whole; the critic is never exported.
        critic = apply_lora(critic, *lora, merge=False) if critic is not None else None
    if not base_reference:
        reference = load_policy(
            cfg.reference or cfg.policy,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            ds_config=loading_config(zero_stage=cfg.zero_stage, bf16=cfg.bf16, offload=cfg.ref_offload),
        )
        reference = frozen_on_device(
            reference, info, zero_stage=cfg.zero_stage, bf16=cfg.bf16, offload=cfg.ref_offload
        )
    # The RM computes in the actor's dtype, as the reference does (`load_reward` loaded it so).
    rm = frozen_on_device(
        reward.model, info, zero_stage=cfg.zero_stage, bf16=cfg.bf16, offload=cfg.rm_offload
    )
    if reward.shares_tokenizer:
        rm_values_fn = shared_rm_values(rm)
    else:
        rm_chat = ChatFormat.from_metadata(reward.tokenizer, meta)  # the RM's own recorded format
        rm_values_fn = foreign_bandit_rm_values(rm, rm_chat, chat, prompt_messages, info.device)
    engine = dict(
        total_steps=total_updates,
        micro_batch_size=cfg.micro_train_batch_size,
        grad_accum=grad_accum,
        config=cfg,
        resumes_zero_state=cfg.resume and zero_partitioned(latest_state(cfg.output_dir / "state")),
    )
    actor, actor_sched = training_engine(actor, lr=cfg.actor_lr, **engine)
    critic, critic_sched = training_engine(critic, lr=cfg.critic_lr, **engine) if critic else (None, None)
    if base_reference:
        from segppo.models.lora import AdapterFreeView

        reference = AdapterFreeView(actor)
    return Models(actor, actor_sched, critic, critic_sched, reference, rm_values_fn, zero3)


def build_rollout_engine(cfg: PPOConfig, info: DistInfo, actor, pad_token_id: int):
    """The rollout engine `--rollout-engine` names: HF `generate` on the training actor, or a
    colocated in-process vLLM engine on the policy folder. Call it *after* the DeepSpeed engines
    are built (an in-process vLLM initialises torch.distributed itself); the trainer pushes the
    actor's weights into a vLLM engine after every update and after a resume."""
    from segppo.generation import HFEngine

    if cfg.rollout_engine == "hf":
        return HFEngine(actor, pad_token_id, info.device)
    from segppo.vllm_engine import VLLMEngine

    return VLLMEngine(
        cfg.policy,
        pad_token_id=pad_token_id,
        dtype="bfloat16" if cfg.bf16 else "float32",
        max_model_len=cfg.max_prompt_len + cfg.max_new_tokens,
        seed=cfg.seed + info.rank,
        trust_remote_code=cfg.trust_remote_code,
    )
