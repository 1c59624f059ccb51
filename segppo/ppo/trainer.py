"""`segppo ppo train`: PPO against dense segment (or token, or bandit) rewards.

One step reads top to bottom:
  1. generate: each rank samples responses to its share of `rollout_batch_size` prompts;
  2. score: policy and reference log-probs, reference entropy (segmentation), RM values, critic
     values → dense rewards (`segment_rewards`) − β·KL → GAE (`gae`) → advantages whitened over
     the whole rollout on every rank;
  3. train: `ppo_epochs` passes of clipped policy and value losses, `train_batch_size` samples per
     optimizer step, normalised by the step's token count over all ranks (a global token mean,
     whatever the micro-batch or rank split).

Output folder:
    policy/               the final policy (AutoModelForCausalLM, safetensors) + segppo.json
    checkpoints/step-N/   the policy every `save_every` steps
    state/                DeepSpeed state of actor and critic, RNG, KL controller, prompt position
    metrics.jsonl, samples.jsonl, run_config.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from segppo.config import PPOConfig
from segppo.data import ChatFormat, EncodedPrompt, LayoutOptions, collate_responses, encode_prompts, load_rows
from segppo.distributed import (
    DistInfo,
    all_reduce_sum,
    check_run_folder,
    frozen_on_device,
    full_state_dict,
    init_distributed,
    latest_state,
    launch,
    load_training_state,
    save_training_state,
    set_seed,
    shutdown,
)
from segppo.io import same_source
from segppo.models import (
    SegppoMetadata,
    create_reward_model,
    disable_dropout,
    load_policy,
    load_reward_model,
    load_tokenizer,
    save_policy,
)
from segppo.models.reward_model import run_model_folder
from segppo.normalizer import DEFAULT_SIGMA_FLOOR, Normalizer
from segppo.optim import training_engine
from segppo.ppo.losses import (
    KLController,
    explained_variance,
    global_mean_var,
    policy_loss,
    value_loss,
    whiten,
)
from segppo.ppo.rollout import (
    Experience,
    RewardSetup,
    SamplingConfig,
    critic_values,
    foreign_bandit_rm_values,
    generate,
    make_experience,
    shared_rm_values,
)
from segppo.rm.scoring import Segmentation
from segppo.segments import logprobs_and_entropy
from segppo.tracking import LiveProgress, Tracker, console, truncate_metrics, write_config

StepCallback = Callable[[int, dict], None]


class NonFiniteError(FloatingPointError):
    """A reward, advantage or loss was NaN or infinite; the last good state was saved first."""


# ---------------------------------------------------------------------------------------------
# Set-up: models, rewards, prompts


@dataclass
class RewardModelSpec:
    model: torch.nn.Module
    metadata: SegppoMetadata
    tokenizer: object
    shares_tokenizer: bool


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def load_reward(cfg: PPOConfig, policy_tokenizer) -> RewardModelSpec:
    """The frozen reward model, checked against the policy's tokenizer (DESIGN.md §3.6)."""
    model, metadata = load_reward_model(
        cfg.reward_model,
        trust_remote_code=cfg.trust_remote_code,
        granularity=cfg.reward_granularity,
        threshold=cfg.entropy_threshold,
    )
    folder = run_model_folder(Path(cfg.reward_model)) if Path(cfg.reward_model).is_dir() else cfg.reward_model
    tokenizer = load_tokenizer(folder, trust_remote_code=cfg.trust_remote_code)
    shares = _same_tokenizer(tokenizer, policy_tokenizer)
    granularity = Segmentation.resolve(metadata.granularity, metadata.threshold or 0.0).granularity
    if not shares and granularity != "bandit":
        raise ValueError(
            f"the {granularity}-level reward model {cfg.reward_model} uses a different tokenizer from the "
            f"policy {cfg.policy}; dense rewards are placed on the policy's tokens, so they must share one "
            "(only a bandit RM can be scored through its own tokenizer)"
        )
    disable_dropout(model)
    return RewardModelSpec(model, metadata, tokenizer, shares)


def resolve_normalizer(cfg: PPOConfig, metadata: SegppoMetadata, granularity: str):
    """`(params [a, b, c, d] or None, sigma_floor)` from --normalizer, --reward-mean/std, or what the
    RM records; `--sigma-floor` overrides the normalizer's own floor (default 1e-2)."""
    floor = cfg.sigma_floor
    if not cfg.normalize:
        return None, floor or DEFAULT_SIGMA_FLOOR
    if cfg.normalizer:
        normalizer = Normalizer.load(cfg.normalizer)
        return normalizer.as_kernel_params(), floor or normalizer.sigma_floor
    if cfg.reward_mean is not None or cfg.reward_std is not None:
        if cfg.reward_mean is None or cfg.reward_std is None:
            raise ValueError("--reward-mean and --reward-std go together")
        return (0.0, 0.0, cfg.reward_mean, cfg.reward_std), floor or DEFAULT_SIGMA_FLOOR
    recorded = metadata.normalizer or {}
    if recorded.get("params"):
        params = tuple(float(x) for x in recorded["params"])
        return params, floor or float(recorded.get("sigma_floor", DEFAULT_SIGMA_FLOOR))
    if granularity == "bandit" and metadata.score_mean is not None and metadata.score_std:
        return (0.0, 0.0, metadata.score_mean, metadata.score_std), floor or DEFAULT_SIGMA_FLOOR
    if granularity != "bandit":
        console.print(
            "[yellow]warning:[/] no normalizer for a dense reward model: segment rewards are used raw. "
            "Fit one with `segppo fit-normalizer` and pass --normalizer (or --no-normalize to silence this)."
        )
    return None, floor or DEFAULT_SIGMA_FLOOR


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


def stop_token_ids(chat: ChatFormat, tokenizer, extra: list[str] | None) -> tuple[int, ...]:
    ids = list(chat.stop_token_ids)
    for token in extra or []:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"--stop-token {token!r} is not a single token of the policy's tokenizer")
        ids.append(int(token_id))
    return tuple(dict.fromkeys(ids))


def load_prompts(cfg: PPOConfig, tokenizer, template: str | None) -> list[EncodedPrompt]:
    rows = load_rows(cfg.prompts, split=cfg.split, max_samples=cfg.max_samples)
    prompts, report = encode_prompts(
        rows,
        tokenizer,
        LayoutOptions(prompt_key=cfg.prompt_key),
        max_prompt_len=cfg.max_prompt_len,
        on_long_prompt=cfg.long_prompts,
        chat_template=template,
    )
    if not prompts:
        raise ValueError(f"{cfg.prompts}: the prompt set is empty ({report})")
    return prompts


# ---------------------------------------------------------------------------------------------
# Per-sample records: experiences are regrouped into training micro-batches


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    has_eos: bool
    logprobs: torch.Tensor  # [L] each
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def split_samples(exp: Experience) -> list[Sample]:
    batch = exp.batch
    samples = []
    for row in range(batch.input_ids.shape[0]):
        length = int(batch.response_mask[row].sum())
        samples.append(
            Sample(
                batch.prompt_ids(row),
                batch.response_ids[row, :length].tolist(),
                bool(batch.has_eos[row]),
                exp.logprobs[row, :length],
                exp.values[row, :length],
                exp.advantages[row, :length],
                exp.returns[row, :length],
            )
        )
    return samples


def _pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0])) for r in rows])


def collate_samples(samples: list[Sample], pad_token_id: int, device):
    batch = collate_responses(
        [s.prompt_ids for s in samples],
        [s.response_ids for s in samples],
        [s.has_eos for s in samples],
        pad_token_id,
    ).to(device)
    T = batch.response_mask.shape[1]
    tensors = {
        name: _pad([getattr(s, name) for s in samples], T).to(device)
        for name in ("logprobs", "values", "advantages", "returns")
    }
    return batch, tensors


# ---------------------------------------------------------------------------------------------


def train_ppo(cfg: PPOConfig, *, step_callback: StepCallback | None = None) -> Path:
    """Run PPO on `cfg.nproc` local ranks (or an outer launcher's); returns the policy folder."""
    check_run_folder(cfg.output_dir, resume=cfg.resume)
    launch(_train, cfg, step_callback, nproc=cfg.nproc)
    return cfg.output_dir / "policy"


def _train(cfg: PPOConfig, step_callback: StepCallback | None) -> None:
    info = init_distributed()
    try:
        PPOTrainer(cfg, info).fit(step_callback)
    finally:
        shutdown()


def _seed_for(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**31 - 1)
    return value


class PPOTrainer:
    """Holds the four models and runs PPO steps; `fit` is the whole run."""

    def __init__(self, cfg: PPOConfig, info: DistInfo):

        self.cfg, self.info = cfg, info
        set_seed(cfg.seed + info.rank)
        self.tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
        self.reward = load_reward(cfg, self.tokenizer)
        meta = self.reward.metadata
        self.segmentation = Segmentation.resolve(meta.granularity, meta.threshold or 0.0)
        reference_name = cfg.reference or cfg.policy
        if (
            self.segmentation.needs_entropy
            and meta.segmenter
            and not same_source(meta.segmenter, reference_name)
        ):
            console.print(
                f"[yellow]warning:[/] the reward model was segmented with {meta.segmenter}, but PPO takes "
                f"entropy from the reference {reference_name}; segments may differ from the RM's training"
            )
        template = resolve_chat_template(cfg, self.reward)
        self.chat = ChatFormat(self.tokenizer, template)
        self.prompts = load_prompts(cfg, self.tokenizer, template)
        self.per_rank, self.grad_accum = cfg.batch_layout(info.world_size)
        self.steps_per_episode = len(self.prompts) // cfg.rollout_batch_size
        if self.steps_per_episode == 0:
            raise ValueError(
                f"{cfg.prompts}: {len(self.prompts)} prompts, fewer than one --rollout-batch-size "
                f"({cfg.rollout_batch_size})"
            )
        self.total_steps = self.steps_per_episode * cfg.num_episodes
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        dense = self.segmentation.granularity != "bandit"
        normalizer, sigma_floor = resolve_normalizer(cfg, meta, self.segmentation.granularity)
        self.setup = RewardSetup(
            segmentation=self.segmentation,
            normalizer=normalizer,
            sigma_floor=sigma_floor,
            distribute=cfg.distribute,
            reward_clip=cfg.reward_clip,
            kl_estimator=cfg.kl_estimator,
            missing_eos_penalty=cfg.missing_eos_penalty,
            overlong_penalty=cfg.overlong_penalty,
            max_response_len=cfg.max_response_len,
            gamma=cfg.gamma,
            lam=cfg.lam,
        )
        self.value_clip = cfg.value_clip if cfg.value_clip is not None else (0.25 if dense else 0.2)
        self.kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_token_ids=stop_token_ids(self.chat, self.tokenizer, cfg.stop_token),
            synced_gpus=cfg.zero_stage == 3 and info.world_size > 1,
        )

        # Models: actor and critic train under DeepSpeed; reference and RM are frozen.
        dtype = "bf16" if cfg.bf16 else "fp32"
        kw = dict(trust_remote_code=cfg.trust_remote_code)
        actor = load_policy(cfg.policy, gradient_checkpointing=cfg.gradient_checkpointing, **kw)
        if cfg.critic_init == "rm":
            if not self.reward.shares_tokenizer:
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
            disable_dropout(model)
        reference = load_policy(cfg.reference or cfg.policy, dtype=dtype, **kw)
        self.reference = frozen_on_device(reference, info, zero_stage=cfg.zero_stage, bf16=cfg.bf16)
        self.rm = frozen_on_device(self.reward.model, info, zero_stage=cfg.zero_stage, bf16=cfg.bf16)
        if self.reward.shares_tokenizer:
            self.rm_values_fn = shared_rm_values(self.rm)
        else:
            rm_chat = ChatFormat(self.reward.tokenizer, meta.chat_template)
            self.rm_values_fn = foreign_bandit_rm_values(
                self.rm, rm_chat, self.tokenizer, self._prompt_messages, info.device
            )

        updates = self.total_steps * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.train_batch_size)
        micro = cfg.micro_train_batch_size
        self.actor, self.actor_sched = training_engine(
            actor,
            lr=cfg.actor_lr,
            total_steps=updates,
            micro_batch_size=micro,
            grad_accum=self.grad_accum,
            config=cfg,
        )
        self.critic, self.critic_sched = training_engine(
            critic,
            lr=cfg.critic_lr,
            total_steps=updates,
            micro_batch_size=micro,
            grad_accum=self.grad_accum,
            config=cfg,
        )
        self._prompt_of_ids: dict[tuple[int, ...], list[dict]] = {}

    def _prompt_messages(self, batch) -> list[list[dict]]:
        return [self._prompt_of_ids[tuple(batch.prompt_ids(row))] for row in range(batch.input_ids.shape[0])]

    # -- one step -------------------------------------------------------------------------------

    def rollout(self, step: int) -> list[Experience]:
        """Generate and score this rank's share of the step's prompts."""
        cfg, info = self.cfg, self.info
        episode, index = divmod(step, self.steps_per_episode)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(cfg.seed + episode))
        chosen = order[index * cfg.rollout_batch_size : (index + 1) * cfg.rollout_batch_size].tolist()
        m = cfg.micro_rollout_batch_size
        batches = []
        self.actor.eval()
        start = time.perf_counter()
        # Micro-rollout j goes to rank j mod world and samples from a seed of its own, so a run gives
        # the same responses on any number of ranks.
        for j in range(info.rank, cfg.rollout_batch_size // m, info.world_size):
            prompts = [self.prompts[i] for i in chosen[j * m : (j + 1) * m]]
            for p in prompts:
                self._prompt_of_ids[tuple(p.prompt_ids)] = p.messages
            torch.manual_seed(_seed_for(cfg.seed, step, j))
            batches.append(
                generate(self.actor, prompts, self.sampling, self.tokenizer.pad_token_id, info.device)
            )
        self.timing["generation"] = time.perf_counter() - start
        start = time.perf_counter()
        experiences = [
            make_experience(
                b,
                actor=self.actor,
                critic=self.critic,
                reference=self.reference,
                rm_values_fn=self.rm_values_fn,
                setup=self.setup,
                kl_coef=self.kl_ctl.coef,
            )
            for b in batches
        ]
        if cfg.whiten_advantages:
            adv = torch.cat([e.advantages.flatten() for e in experiences])
            mask = torch.cat([e.batch.response_mask.flatten() for e in experiences])
            mean, var = global_mean_var(adv, mask)
            for e in experiences:
                e.advantages = whiten(e.advantages, e.batch.response_mask, mean, var)
        self.timing["scoring"] = time.perf_counter() - start
        self.timing["rewards"] = sum(e.reward_seconds for e in experiences)
        return experiences

    def rollout_metrics(self, experiences: list[Experience]) -> dict[str, float]:
        """Means over every rank's responses."""
        names = (
            "responses",
            "tokens",
            "raw_reward",
            "normalized_reward",
            "kl",
            "entropy",
            "length",
            "segments",
            "eos",
            "nonfinite",
        )
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.info.device)
        for e in experiences:
            mask = e.batch.response_mask
            finite = torch.isfinite(e.rewards).all() & torch.isfinite(e.advantages).all()
            sums += torch.stack(
                [
                    torch.tensor(float(mask.shape[0]), device=mask.device),
                    mask.sum().float(),
                    e.raw_score.sum(),
                    e.segments.rewards.sum(),
                    e.kl.sum(),
                    torch.where(mask, e.policy_entropy, 0.0).sum(),
                    mask.sum().float(),
                    e.segments.num_segments.sum().float(),
                    e.batch.has_eos.sum().float(),
                    (~finite).float(),
                ]
            ).double()
        all_reduce_sum(sums)
        s = dict(zip(names, sums.tolist(), strict=True))
        n = max(s["responses"], 1.0)
        return {
            "reward": s["raw_reward"] / n,
            "normalized_reward": s["normalized_reward"] / n,
            "kl": s["kl"] / n,
            "kl_coef": self.kl_ctl.coef,
            "entropy": s["entropy"] / max(s["tokens"], 1.0),
            "response_length": s["length"] / n,
            "segments": s["segments"] / n,
            "segment_length": s["length"] / max(s["segments"], 1.0),
            "eos_fraction": s["eos"] / n,
            "nonfinite": s["nonfinite"],
            "tokens": s["tokens"],
            "responses": s["responses"],
        }

    def train_on(self, experiences: list[Experience], step: int) -> dict[str, float]:
        """`ppo_epochs` passes of clipped policy and value updates over this rank's samples."""
        cfg, info = self.cfg, self.info
        samples = [s for e in experiences for s in split_samples(e)]
        per_update = cfg.train_batch_size // info.world_size
        names = ("policy_loss", "policy_clipfrac", "approx_kl", "value_loss", "value_clipfrac", "tokens")
        sums = torch.zeros(len(names), dtype=torch.float64, device=info.device)
        self.actor.train()
        self.critic.train()
        start = time.perf_counter()
        for epoch in range(cfg.ppo_epochs):
            generator = torch.Generator().manual_seed(_seed_for(cfg.seed, step, epoch, info.rank))
            order = torch.randperm(len(samples), generator=generator).tolist()
            for u in range(0, len(order), per_update):
                update = [samples[i] for i in order[u : u + per_update]]
                # The update's token count over all ranks: each micro-batch's loss is a sum over its
                # tokens divided by it, undoing DeepSpeed's mean over micro-batches and ranks.
                tokens = torch.tensor([float(sum(len(s.response_ids) for s in update))], device=info.device)
                all_reduce_sum(tokens)
                scale = self.grad_accum * info.world_size / max(tokens.item(), 1.0)
                for k in range(0, len(update), cfg.micro_train_batch_size):
                    micro = update[k : k + cfg.micro_train_batch_size]
                    stats = self._micro_step(micro, scale, step)
                    sums += torch.stack([stats[n] for n in names[:-1]] + [stats["tokens"]]).double()
        all_reduce_sum(sums)
        s = dict(zip(names, sums.tolist(), strict=True))
        tokens = max(s.pop("tokens"), 1.0)
        self.timing["training"] = time.perf_counter() - start
        return {k: v / tokens for k, v in s.items()}

    def _micro_step(self, micro: list[Sample], scale: float, step: int) -> dict[str, torch.Tensor]:
        batch, old = collate_samples(micro, self.tokenizer.pad_token_id, self.info.device)
        mask = batch.response_mask
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
        logprobs, _ = logprobs_and_entropy(self.actor, *args)
        p_loss, p_stats = policy_loss(
            logprobs, old["logprobs"], old["advantages"], mask, clip=self.cfg.policy_clip, scale=scale
        )
        values = critic_values(self.critic, batch)
        v_loss, v_stats = value_loss(
            values, old["values"], old["returns"], mask, clip=self.value_clip, scale=scale
        )
        if not (torch.isfinite(p_loss) and torch.isfinite(v_loss)):
            self._stop_non_finite(step, f"the {'policy' if not torch.isfinite(p_loss) else 'value'} loss")
        self.actor.backward(p_loss)
        self.actor.step()
        self.critic.backward(v_loss)
        self.critic.step()
        return {**p_stats, **v_stats, "tokens": mask.sum().float()}

    # -- the run --------------------------------------------------------------------------------

    def fit(self, step_callback: StepCallback | None = None) -> None:
        cfg, info = self.cfg, self.info
        out = cfg.output_dir
        start_step = 0
        if cfg.resume:
            state = load_training_state(
                {"actor": self.actor, "critic": self.critic}, latest_state(out / "state")
            )
            start_step = int(state["step"])
            self.kl_ctl.load_state_dict(state["kl"])
            if info.is_main:
                truncate_metrics(out, start_step)
                truncate_metrics(out, start_step, name="samples.jsonl")
                console.print(f"resumed from step {start_step} of {self.total_steps}")
        tracker = Tracker(
            out,
            enabled=info.is_main,
            tensorboard=cfg.tensorboard,
            wandb_project=cfg.wandb_project,
            run_name=out.name,
            config=cfg,
        )
        if info.is_main:
            write_config(cfg, out, "run_config.json")
        with LiveProgress(self.total_steps, "ppo", enabled=info.is_main, completed=start_step) as progress:
            for step in range(start_step, self.total_steps):
                self.timing = {}
                step_start = time.perf_counter()
                experiences = self.rollout(step)
                metrics = self.rollout_metrics(experiences)
                if metrics.pop("nonfinite") > 0:
                    self._stop_non_finite(step, "a reward or advantage")
                self._log_samples(experiences, step + 1)
                metrics.update(self.train_on(experiences, step))
                values = torch.cat([e.values.flatten() for e in experiences])
                returns = torch.cat([e.returns.flatten() for e in experiences])
                mask = torch.cat([e.batch.response_mask.flatten() for e in experiences])
                metrics["explained_variance"] = explained_variance(values, returns, mask)
                self.kl_ctl.update(metrics["kl"], int(metrics["responses"]))
                elapsed = time.perf_counter() - step_start
                metrics.update({f"time_{k}": v for k, v in self.timing.items()})
                metrics["time_step"] = elapsed
                metrics["tokens_per_s"] = metrics["tokens"] / elapsed
                metrics["actor_lr"] = self.actor_sched.get_last_lr()[0]
                metrics["critic_lr"] = self.critic_sched.get_last_lr()[0]
                done = step + 1
                tracker.log(done, metrics)
                progress.update(1, reward=metrics["reward"], kl=metrics["kl"], len=metrics["response_length"])
                if cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps:
                    self.save_state(done)
                    self.export(out / "checkpoints" / f"step-{done}")
                if step_callback is not None:
                    step_callback(done, metrics)
        self.save_state(self.total_steps)
        self.export(out / "policy")
        tracker.close()
        if info.is_main:
            console.print(f"[bold green]done[/]: {self.total_steps} PPO steps → {out / 'policy'}")

    def save_state(self, step: int) -> None:
        save_training_state(
            {"actor": self.actor, "critic": self.critic},
            self.cfg.output_dir / "state",
            f"step-{step}",
            {"step": step, "kl": self.kl_ctl.state_dict()},
        )

    def export(self, folder: Path) -> None:
        """The policy as a Hugging Face folder loadable with AutoModelForCausalLM."""
        cfg = self.cfg
        state = full_state_dict(self.actor)
        if self.info.is_main:
            meta = SegppoMetadata(
                kind="policy",
                granularity=self.segmentation.granularity,
                threshold=self.segmentation.threshold,
                segmenter=cfg.reference or cfg.policy,
                chat_template=self.chat.template,
                base_model=cfg.policy,
                normalizer={"params": list(self.setup.normalizer), "sigma_floor": self.setup.sigma_floor}
                if self.setup.normalizer
                else None,
                data={
                    "prompts": cfg.prompts,
                    "split": cfg.split,
                    "reward_model": cfg.reward_model,
                    "steps": self.total_steps,
                },
            )
            save_policy(self.actor.module, self.tokenizer, folder, meta, state_dict=state)
        torch.distributed.barrier()

    def _stop_non_finite(self, step: int, what: str) -> None:
        """Save the last good state (no update of this step has run with the bad values) and stop."""
        self.save_state(step)
        raise NonFiniteError(
            f"step {step + 1}: {what} is not finite; the last good state (after step {step}) is saved in "
            f"{self.cfg.output_dir / 'state'} (resume with --resume after fixing the cause)"
        )

    def _log_samples(self, experiences: list[Experience], step: int) -> None:
        """A few generations per step, with their segments and rewards, into samples.jsonl."""
        if not self.info.is_main or not experiences or self.cfg.num_logged_samples <= 0:
            return
        e = experiences[0]
        lines = []
        for row in range(min(self.cfg.num_logged_samples, e.batch.input_ids.shape[0])):
            length = int(e.batch.response_mask[row].sum())
            ids = e.batch.response_ids[row, :length].tolist()
            ends = torch.nonzero(e.segments.ends[row, :length]).flatten().tolist()
            segments, begin = [], 0
            for end in ends:
                text = self.tokenizer.decode(ids[begin : end + 1])
                segments.append(
                    {"text": text, "reward": float(e.segments.rewards[row, begin : end + 1].sum())}
                )
                begin = end + 1
            prompt_ids = e.batch.prompt_ids(row)
            sample = {
                "step": step,
                "messages": self._prompt_of_ids[tuple(prompt_ids)],
                "prompt": self.tokenizer.decode(prompt_ids),
                "response": self.tokenizer.decode(ids),
                "response_text": self.tokenizer.decode(ids, skip_special_tokens=True),
                "has_eos": bool(e.batch.has_eos[row]),
                "raw_reward": float(e.raw_score[row]),
                "segments": segments,
            }
            lines.append(json.dumps(sample))
        path = self.cfg.output_dir / "samples.jsonl"
        with path.open("a") as f:
            f.write("\n".join(lines) + "\n")
