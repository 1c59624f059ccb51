"""`segppo ppo train`: PPO against dense segment (or token, or bandit) rewards.

`PPOTrainer.ppo_step` is one step, in the order of the algorithm:
  1. generate: each rank samples responses to its share of `rollout_batch_size` prompts;
  2. score: policy and reference log-probs, reference entropy (segmentation), critic and RM values;
  3. rewards: dense rewards (`segment_rewards`), clipped, − β·KL, penalties;
  4. advantages: GAE (`gae`), whitened over the whole rollout on every rank (when the critic's
     update is one optimizer step per epoch, its first training pass gives GAE the values instead of
     a scoring pass: `values_in_update`);
  5. update: `ppo_epochs` passes of clipped policy and value losses, `train_batch_size` samples per
     optimizer step, normalised by the update's token count over all ranks (a global token mean;
     `--loss-agg seq-mean`: each response's mean over the update's responses), whatever the
     micro-batch or rank split.
Set-up is in `segppo.ppo.setup`, the phases in `segppo.ppo.rollout`, regrouping into micro-batches
in `segppo.ppo.samples`, state and export in `segppo.ppo.checkpoint`.

Output folder:
    policy/               the final policy (AutoModelForCausalLM, safetensors) + segppo.json
    checkpoints/step-N/   the policy every `save_every` steps
    state/                DeepSpeed state of actor and critic, RNG, KL controller, prompt position
    metrics.jsonl, samples.jsonl, run_config.json
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from segppo.config import PPOConfig
from segppo.data.packing import (
    PackedBatch,
    pack_response_batch,
    packed_critic_values,
    packed_logprobs_and_entropy,
    packs_in_one_row,
)
from segppo.distributed import (
    DistInfo,
    all_reduce_sum,
    check_run_folder,
    latest_state,
    launch,
    rank_group,
    set_seed,
)
from segppo.generation import SamplingConfig, seed_for, stop_token_ids
from segppo.host_memory import release_freed_host_memory
from segppo.models import load_tokenizer
from segppo.optim import left_out_note, planned_steps
from segppo.ppo import checkpoint
from segppo.ppo.advantages import advantages_and_returns, needs_critic, whitens
from segppo.ppo.losses import (
    KLController,
    loss_denominator,
    policy_loss,
    value_loss,
)
from segppo.ppo.metrics import global_mean_var, rollout_explained_variance, rollout_metrics, throughput, timed
from segppo.ppo.rollout import Experience, advantages, critic_values, rewards, score
from segppo.ppo.samples import RolloutPool, log_samples
from segppo.ppo.setup import (
    build_rollout_engine,
    load_models,
    load_prompts,
    load_reward,
    policy_chat_format,
    resolve_chat_template,
    resolve_chat_template_kwargs,
    reward_shaping,
    warn_on_segmenter_mismatch,
)
from segppo.preflight import check_ppo_train
from segppo.segments import logprobs_and_entropy
from segppo.tracking import LiveProgress, Tracker, console, truncate_metrics, write_config

StepCallback = Callable[[int, dict], None]


class NonFiniteError(FloatingPointError):
    """A reward, advantage or loss was NaN or infinite; the last good state was saved first."""


def train_ppo(cfg: PPOConfig, *, step_callback: StepCallback | None = None) -> Path:
    """Run PPO on `cfg.nproc` local ranks (or an outer launcher's); returns the policy folder."""
    check_ppo_train(cfg)  # paths, hub names and the rank layout, in one line, before start-up
    check_run_folder(cfg.output_dir, resume=cfg.resume)
    checkpoint.check_resume_options(cfg)
    launch(_train, cfg, step_callback, nproc=cfg.nproc, log_dir=cfg.output_dir)
    return cfg.output_dir / "policy"


def scores_from_sampling(cfg: PPOConfig) -> bool:
    """Whether the rollout's log-probs and policy entropy come from sampling itself rather than a
    forward pass of the actor over the finished responses (one of an update's four scoring passes).

    The HF engine samples the training actor, so its per-step logits are the actor's; in float32
    the KV-cached steps and a full forward agree to float32 rounding, and the pass is redundant.
    In bf16 they differ by more than rounding noise (another kernel per shape, bf16 accumulations),
    and a vLLM engine is another implementation of the model: both recompute, so that the ratio of
    the first update starts at 1 up to float32 rounding.
    """
    return cfg.rollout_engine == "hf" and not cfg.bf16


def values_in_update(cfg: PPOConfig) -> bool:
    """Whether the critic's old values (GAE's V, the centre of the value clip) come from its first
    epoch's training forwards rather than a scoring pass over the rollout (one of an update's four).

    With one critic optimizer step per epoch (`--train-batch-size` = the rollout's responses), every
    micro-batch of the first epoch runs the critic at the weights that would have scored the
    rollout, so its forward's values, detached, are the old values: the critic trains its first
    epoch before the actor and hands the values on (`PPOTrainer.fit_critic_first`). Exact in any
    precision: the old values are then the very values the first value loss starts from. With more
    steps per epoch the later micro-batches run at updated weights, so the scoring pass stays.
    """
    return needs_critic(cfg.advantage) and cfg.train_batch_size == cfg.responses_per_rollout


def _train(cfg: PPOConfig, step_callback: StepCallback | None) -> None:
    with rank_group() as info:
        PPOTrainer(cfg, info).fit(step_callback)


class PPOTrainer:
    """Holds the four models and runs PPO steps; `fit` is the whole run."""

    def __init__(self, cfg: PPOConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        set_seed(cfg.seed + info.rank)
        self.tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
        self.reward = load_reward(cfg, self.tokenizer)
        warn_on_segmenter_mismatch(cfg, self.reward)
        self.chat = policy_chat_format(
            self.reward,
            self.tokenizer,
            resolve_chat_template(cfg, self.reward),
            resolve_chat_template_kwargs(cfg, self.reward),
        )
        self.prompts = load_prompts(cfg, self.chat)
        self.per_rank, self.grad_accum = cfg.batch_layout(info.world_size)
        self.steps_per_episode = len(self.prompts) // cfg.rollout_batch_size
        if self.steps_per_episode == 0:
            raise ValueError(
                f"{cfg.prompts}: {len(self.prompts)} prompts, fewer than one --rollout-batch-size "
                f"({cfg.rollout_batch_size})"
            )
        self.total_steps, note = planned_steps(
            self.steps_per_episode, cfg.num_episodes, cfg.max_steps, "episode"
        )
        left_out = left_out_note(len(self.prompts), cfg.rollout_batch_size, "prompts", "rollouts", "episode")
        for line in (left_out, note):
            if line and info.is_main:
                console.print(line)
        self.shaping = reward_shaping(cfg, self.reward)
        dense = self.shaping.segmentation.granularity != "bandit"
        self.value_clip = cfg.value_clip if cfg.value_clip is not None else (0.25 if dense else 0.2)
        self.kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_token_ids=stop_token_ids(self.chat, self.tokenizer, cfg.stop_token),
            synced_gpus=cfg.zero_stage == 3 and info.world_size > 1,
        )
        self._prompt_of_ids: dict[tuple[int, ...], list[dict]] = {}
        updates = self.total_steps * cfg.ppo_epochs * (cfg.responses_per_rollout // cfg.train_batch_size)
        self.models = load_models(
            cfg,
            info,
            self.reward,
            self.chat,
            total_updates=updates,
            grad_accum=self.grad_accum,
            prompt_messages=self._prompt_messages,
        )
        self.engine = build_rollout_engine(cfg, info, self.models.actor, self.tokenizer.pad_token_id)
        self.scores_from_sampling = scores_from_sampling(cfg)
        self.values_in_update = values_in_update(cfg)
        # One optimizer step's packed micro-batches by their rows (`_packed`), emptied at each step.
        self._packs: dict[tuple[int, ...], PackedBatch] = {}

    def _prompt_messages(self, batch) -> list[list[dict]]:
        return [self._prompt_of_ids[tuple(batch.prompt_ids(row))] for row in range(batch.input_ids.shape[0])]

    # -- one step -------------------------------------------------------------------------------

    def ppo_step(self, step: int) -> dict[str, float]:
        """One PPO step: generate → score → rewards → advantages → update; returns its metrics."""
        cfg, m = self.cfg, self.models
        timing: dict[str, float] = {}
        step_start = time.perf_counter()
        with timed(timing, "generation"):
            batches = self.generate(step)
            if cfg.rollout_engine == "vllm":
                self.engine.sleep()  # GPU: vLLM frees its KV cache while the actor scores and trains
        with timed(timing, "scoring"):
            actor, critic, reference = m.actor, m.critic, m.reference
            experiences = [
                score(
                    b,
                    actor=actor,
                    critic=None if self.values_in_update else critic,
                    reference=reference,
                    rm_values_fn=m.rm_values_fn,
                    temperature=cfg.temperature,
                    sampled=sampled,
                )
                for b, sampled in batches
            ]
            with timed(timing, "rewards"):  # segmentation through GAE
                experiences = [rewards(e, self.shaping, self.kl_ctl.coef) for e in experiences]
                if not self.values_in_update:
                    experiences = self.advantages(experiences)
        with timed(timing, "training"):
            critic_first = None
            if self.values_in_update:  # the critic's first epoch gives GAE its values
                critic_first = self.fit_critic_first(experiences, step)
                experiences = self.advantages(experiences)
            metrics = rollout_metrics(experiences, self.info.device, self.kl_ctl.coef)
            if metrics.pop("nonfinite") > 0:
                self._stop_non_finite(step, "a reward or advantage", updated=critic_first is not None)
            pool = RolloutPool.of(experiences, self.tokenizer.pad_token_id)
            metrics.update(self.update(pool, step, critic_first))
            self.sync_rollout_engine()  # part of the update: the next rollout samples the new policy
            release_freed_host_memory()  # else glibc keeps the step's freed activations (host_memory)
        # After the update: a step stopped inside it (`_stop_non_finite`) saves a state that must not
        # count this step's samples as logged.
        self._log_samples(experiences, step + 1)
        if m.critic is not None:
            metrics["explained_variance"] = rollout_explained_variance(experiences)
        # --kl-target is a per-token mean KL, as OpenRLHF's and the paper's (`kl` is per response).
        self.kl_ctl.update(metrics["kl_per_token"], int(metrics["responses"]))
        metrics.update({f"time_{k}": v for k, v in timing.items()})
        metrics.update(throughput(timing, time.perf_counter() - step_start, metrics["tokens"]))
        return metrics

    def sync_rollout_engine(self) -> None:
        """Push the actor's weights into a vLLM rollout engine (the HF engine samples the actor itself)."""
        if self.cfg.rollout_engine == "vllm":
            from segppo.vllm_engine import gathered_weights

            self.engine.update_weights(
                gathered_weights(self.models.actor.module, zero_stage=self.cfg.zero_stage)
            )

    def generate(self, step: int):
        """This rank's share of the step's prompts, `n_samples_per_prompt` responses each, in
        micro-rollout batches: `(batch, SampledScores or None)` each (`scores_from_sampling`)."""
        cfg, info = self.cfg, self.info
        episode, index = divmod(step, self.steps_per_episode)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(cfg.seed + episode))
        chosen = order[index * cfg.rollout_batch_size : (index + 1) * cfg.rollout_batch_size].tolist()
        n = cfg.n_samples_per_prompt
        per_micro = cfg.micro_rollout_batch_size // n  # prompts per micro-rollout
        batches = []
        self.models.actor.eval()
        # Micro-rollout j goes to rank j mod world and samples from a seed of its own, so a run gives
        # the same responses on any number of ranks. A prompt's n samples are consecutive rows of
        # one micro-rollout (`group_ids_for`), so a group never straddles batches or ranks.
        for j in range(info.rank, cfg.responses_per_rollout // cfg.micro_rollout_batch_size, info.world_size):
            prompts = [self.prompts[i] for i in chosen[j * per_micro : (j + 1) * per_micro] for _ in range(n)]
            for p in prompts:
                self._prompt_of_ids[tuple(p.prompt_ids)] = p.messages
            torch.manual_seed(seed_for(cfg.seed, step, j))
            if self.scores_from_sampling:
                batches.append(self.engine.generate_scored(prompts, self.sampling))
            else:
                batches.append((self.engine.generate(prompts, self.sampling), None))
        return batches

    def advantages(self, experiences: list[Experience]) -> list[Experience]:
        """The estimator's advantages and returns (GAE's from the experiences' values), whitened
        over every rank's rollout when asked."""
        cfg = self.cfg
        return advantages(
            experiences,
            cfg.advantage,
            n_samples_per_prompt=cfg.n_samples_per_prompt,
            gamma=cfg.gamma,
            lam=cfg.lam,
            whiten_with=global_mean_var if whitens(cfg.advantage, cfg.whiten_advantages) else None,
        )

    def update_plan(self, pool: RolloutPool, step: int) -> list[tuple[list[int], float]]:
        """Each optimizer step's rows over the `ppo_epochs` (a fresh order per epoch) and the loss
        denominator over all ranks (its tokens, or its responses for seq-mean), in one collective:
        each micro-batch's loss is divided by it, undoing DeepSpeed's mean over micro-batches and
        ranks, so the loss does not depend on how rows are split between them."""
        cfg, info = self.cfg, self.info
        per_update = cfg.train_batch_size // info.world_size
        updates = []
        for epoch in range(cfg.ppo_epochs):
            generator = torch.Generator().manual_seed(seed_for(cfg.seed, step, epoch, info.rank))
            order = torch.randperm(len(pool), generator=generator).tolist()
            updates += [order[u : u + per_update] for u in range(0, len(order), per_update)]
        counts = [
            loss_denominator([pool.response_lengths[i] for i in rows], cfg.loss_agg) for rows in updates
        ]
        denominators = all_reduce_sum(torch.tensor(counts, device=info.device)).tolist()
        return list(zip(updates, denominators, strict=True))

    def micro_batches(self, rows: list[int]) -> list[list[int]]:
        size = self.cfg.micro_train_batch_size
        return [rows[k : k + size] for k in range(0, len(rows), size)]

    def fit_critic_first(self, experiences: list[Experience], step: int) -> dict:
        """The critic's first epoch, one optimizer step (`values_in_update`), before the actor's:
        each micro-batch's forward runs at the weights the rollout was generated with, so its values
        are the old values. Their GAE returns are the targets, the critic steps once, and the values
        go into the experiences for the actor's advantages. Returns what `update` needs of it: the
        value-loss sums, the lr of the step, the step's plan (`update_plan`: its pool has the
        update's rows in the same order, and the plan depends only on the rows' count and response
        lengths, so `update` reuses it instead of a second shuffle and collective) and the packed
        micro-batches (`--packing`), which the actor's first optimizer step runs over too."""
        cfg, info, m = self.cfg, self.info, self.models
        finite = torch.stack([torch.isfinite(e.rewards).all() for e in experiences]).all()
        if all_reduce_sum((~finite).float()).item() > 0:
            self._stop_non_finite(step, "a reward or advantage", updated=False)
        pool = RolloutPool.of(experiences, self.tokenizer.pad_token_id, names=("rewards",))
        plan = self.update_plan(pool, step)
        [(rows, total)] = plan[:1]  # the first epoch is one update
        scale = self.grad_accum * info.world_size / max(total, 1.0)
        values = torch.zeros_like(pool.tensors["rewards"])

        def loss(micro_rows: list[int]):
            batch, tensors = pool.micro_batch(micro_rows)
            mask = batch.response_mask
            new = self._values(batch, micro_rows)
            old = torch.where(mask, new.detach(), 0.0)
            values[torch.as_tensor(micro_rows, device=values.device), : old.shape[1]] = old
            _, returns = advantages_and_returns(
                "gae", tensors["rewards"], mask, values=old, gamma=cfg.gamma, lam=cfg.lam
            )
            return value_loss(new, old, returns, mask, clip=self.value_clip, scale=scale, agg=cfg.loss_agg)

        lr = m.critic_sched.get_last_lr()[0]
        m.critic.train()
        self._packs = {}
        sums = self.optimizer_step(m.critic, loss, rows, step, "the value loss", updated=False)
        start = 0  # the pool's rows are the experiences' rows, in order
        for e in experiences:
            rows_here, width = e.values.shape
            e.values = values[start : start + rows_here, :width].clone()
            start += rows_here
        return {"sums": sums, "lr": lr, "plan": plan, "packs": self._packs}

    def optimizer_step(
        self, engine, loss_of, rows: list[int], step: int, what: str, *, updated: bool
    ) -> dict[str, torch.Tensor]:
        """One optimizer step of `engine` over `rows` in micro-batches, `loss_of(micro_rows) ->
        (loss, stats)` each; returns the stats summed.

        One collective check of the losses before the backward that ends the gradient accumulation:
        no optimizer step ever runs on non-finite gradients, and every rank stops together
        (`updated`: whether an update of this step has been applied before this one).
        """
        sums: dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros((), device=self.info.device)
        micro = self.micro_batches(rows)
        for k, micro_rows in enumerate(micro):
            loss, stats = loss_of(micro_rows)
            nonfinite += (~torch.isfinite(loss)).float()
            if k == len(micro) - 1 and all_reduce_sum(nonfinite).item() > 0:
                self._stop_non_finite(step, what, updated=updated)
            engine.backward(loss)
            engine.step()
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + value.double()
        return sums

    def update(self, pool: RolloutPool, step: int, critic_first: dict | None = None) -> dict[str, float]:
        """`ppo_epochs` passes of clipped policy and value updates over this rank's samples; with
        `critic_first` (`fit_critic_first`'s) the critic's first epoch has run already, on the first
        update of its plan, which this one follows.

        Each optimizer step runs one model over its micro-batches, then the other: a model's
        gradients and activations are freed before the other's are made. Interleaving them per
        micro-batch held both models' gradients at once; with SmolLM2 on CPU (two micro-batches a
        step) the training phase took 1.16-1.31x as long (benchmarks/RESULTS.md, issue 22).
        """
        info, m = self.info, self.models
        names = (
            "policy_loss",
            "policy_clipfrac",
            "policy_dual_clipfrac",
            "approx_kl",
            "value_loss",
            "value_clipfrac",
            "tokens",
        )
        sums = {name: torch.zeros((), dtype=torch.float64, device=info.device) for name in names}
        if critic_first is not None:
            for name, value in critic_first["sums"].items():
                sums[name] += value
        lrs = {}
        m.actor.train()
        if m.critic is not None:
            m.critic.train()
        plan = self.update_plan(pool, step) if critic_first is None else critic_first["plan"]
        for number, (rows, total) in enumerate(plan):
            scale = self.grad_accum * info.world_size / max(total, 1.0)
            trains_critic = m.critic is not None and not (number == 0 and critic_first is not None)
            # The actor packs this step's micro-batches and the critic reuses them; the critic's
            # first epoch packed the first step's already.
            self._packs = critic_first["packs"] if number == 0 and critic_first is not None else {}
            # The lr this update's optimizer step uses (the schedule steps after it); the step logs
            # its last update's.
            lrs = {"actor_lr": m.actor_sched.get_last_lr()[0]}
            if m.critic_sched is not None:
                lrs["critic_lr"] = m.critic_sched.get_last_lr()[0] if trains_critic else critic_first["lr"]
            applied = number > 0 or critic_first is not None
            passes = [(m.actor, self._policy_loss, "the policy loss")]
            if trains_critic:
                passes.append((m.critic, self._value_loss, "the value loss"))
            for engine, loss, what in passes:
                stats = self.optimizer_step(
                    engine, partial(loss, pool, scale=scale), rows, step, what, updated=applied
                )
                applied = True
                for name, value in stats.items():
                    sums[name] += value
        self._packs = {}
        s = dict(zip(names, all_reduce_sum(torch.stack([sums[n] for n in names])).tolist(), strict=True))
        total_tokens = max(s.pop("tokens"), 1.0)
        return {**{k: v / total_tokens for k, v in s.items()}, **lrs}

    def _packed(self, batch, rows: list[int]) -> PackedBatch | None:
        """`batch`, the pool's rows `rows`, packed into rows without padding (`--packing`), else
        None. Packed once per optimizer step (`_packs`): both models' passes run over its
        micro-batches, and packing is host work (the rows as token lists)."""
        if not self.cfg.packing:
            return None
        key = tuple(rows)
        if key not in self._packs:
            one_row = packs_in_one_row(self.models.actor, self.models.critic)
            packed = pack_response_batch(batch, self.tokenizer.pad_token_id, one_row=one_row)
            self._packs[key] = packed.to(batch.response_mask.device)
        return self._packs[key]

    def _values(self, batch, rows: list[int]) -> torch.Tensor:
        """The critic's values `[B, T]` on a training micro-batch, the pool's rows `rows` (with grad)."""
        packed = self._packed(batch, rows)
        if packed is None:
            return critic_values(self.models.critic, batch)
        return packed_critic_values(self.models.critic, packed)

    def _policy_loss(self, pool: RolloutPool, rows: list[int], scale: float):
        batch, old = pool.micro_batch(rows)
        mask = batch.response_mask
        cfg = self.cfg
        packed = self._packed(batch, rows)
        # At the sampling temperature, as `score` computed the old log-probs.
        if packed is None:
            args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
            logprobs, _ = logprobs_and_entropy(self.models.actor, *args, temperature=cfg.temperature)
        else:
            logprobs, _ = packed_logprobs_and_entropy(self.models.actor, packed, temperature=cfg.temperature)
        loss, stats = policy_loss(
            logprobs,
            old["logprobs"],
            old["advantages"],
            mask,
            clip=cfg.policy_clip,
            clip_high=cfg.policy_clip_high,
            dual_clip=cfg.dual_clip,
            agg=cfg.loss_agg,
            scale=scale,
        )
        return loss, {**stats, "tokens": mask.sum().float()}

    def _value_loss(self, pool: RolloutPool, rows: list[int], scale: float):
        batch, old = pool.micro_batch(rows)
        return value_loss(
            self._values(batch, rows),
            old["values"],
            old["returns"],
            batch.response_mask,
            clip=self.value_clip,
            scale=scale,
            agg=self.cfg.loss_agg,
        )

    # -- the run --------------------------------------------------------------------------------

    def fit(self, step_callback: StepCallback | None = None) -> None:
        cfg, info, m = self.cfg, self.info, self.models
        out = cfg.output_dir
        start_step = 0
        if cfg.resume:
            start_step = checkpoint.load_state(cfg, m, self.kl_ctl)
            self.sync_rollout_engine()
            if info.is_main:
                truncate_metrics(out, start_step)
                truncate_metrics(out, start_step, name="samples.jsonl")
                console.print(f"resumed from step {start_step} of {self.total_steps}")
        record = self.run_record()
        tracker = Tracker(
            out,
            enabled=info.is_main,
            tensorboard=cfg.tensorboard,
            wandb_project=cfg.wandb_project,
            run_name=out.name,
            config=record,
        )
        if info.is_main:
            write_config(record, out, "run_config.json")
        with LiveProgress(self.total_steps, "ppo", enabled=info.is_main, completed=start_step) as progress:
            for step in range(start_step, self.total_steps):
                step_start = time.perf_counter()
                metrics = self.ppo_step(step)
                elapsed = time.perf_counter() - step_start
                metrics["time_step"] = elapsed
                metrics["tokens_per_s"] = metrics["tokens"] / elapsed
                done = step + 1
                tracker.log(done, metrics)
                progress.update(
                    1,
                    tokens=metrics["tokens"],
                    reward=metrics["reward"],
                    kl=metrics["kl"],
                    len=metrics["response_length"],
                )
                if cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps:
                    checkpoint.save_state(cfg, m, self.kl_ctl, done)
                    self.export(out / "checkpoints" / f"step-{done}", steps=done)
                if step_callback is not None:
                    step_callback(done, metrics)
        checkpoint.save_state(cfg, m, self.kl_ctl, self.total_steps)
        self.export(out / "policy", steps=self.total_steps)
        tracker.close()
        if info.is_main:
            console.print(f"[bold green]done[/]: {self.total_steps} PPO steps → {out / 'policy'}")

    def run_record(self) -> dict:
        """What run_config.json records: the options, with the chat template and its variables the
        prompts were rendered with (without --chat-template(-kwargs), the RM's recorded ones; null
        there said nothing of them), and the sampling as drawn (log-probs, ratios and KL are at its
        temperature)."""
        chat = self.chat.metadata_fields()
        return {
            **dataclasses.asdict(self.cfg),
            "chat_template": chat["chat_template"],
            "chat_template_kwargs": chat["chat_template_kwargs"],
            "sampling": self.sampling.describe(),
        }

    def export(self, folder: Path, *, steps: int) -> None:
        """The policy after `steps` PPO steps (what its segppo.json records) as a folder."""
        checkpoint.export_policy(
            self.cfg,
            self.models.actor,
            self.tokenizer,
            self.chat,
            self.shaping,
            folder,
            steps=steps,
            is_main=self.info.is_main,
        )

    def _log_samples(self, experiences: list[Experience], step: int) -> None:
        if self.info.is_main and experiences and self.cfg.num_logged_samples > 0:
            path, count = self.cfg.output_dir / "samples.jsonl", self.cfg.num_logged_samples
            messages = lambda ids: self._prompt_of_ids[tuple(ids)]  # noqa: E731
            log_samples(path, experiences[0], self.tokenizer, messages, count, step)

    def _stop_non_finite(self, step: int, what: str, *, updated: bool) -> None:
        """Stop every rank (all call this together); save the state when it is the end of a step.

        With no update of this step applied the models are as step `step` left them, so that state is
        saved as `step-{step}`. After some of its updates the models are mid-step: no state is saved
        (it would replay the step on a partly updated model) and a resume starts from the latest one.
        """
        state = self.cfg.output_dir / "state"
        if not updated:
            checkpoint.save_state(self.cfg, self.models, self.kl_ctl, step)
            saved = (
                f"the last good state (after step {step}) is saved in {state} "
                "(resume with --resume after fixing the cause)"
            )
        elif (latest := latest_state(state)) is not None:
            saved = (
                "updates of this step had run, so no state was saved; after fixing the cause, "
                f"--resume continues from {latest}"
            )
        else:
            saved = "updates of this step had run and no earlier state was saved: there is nothing to resume"
        raise NonFiniteError(f"step {step + 1}: {what} is not finite; {saved}")
