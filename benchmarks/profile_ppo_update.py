"""Where segppo's PPO update spends its time, per phase and per operation (issue 22).

Runs `PPOTrainer.ppo_step` in this process on the inputs `ppo_vs_trl.py` prepared (its work folder's
spec.json: the real model, a bandit or segment reward model, 8 prompts per update, 32 new tokens,
two optimizer steps of 4) and times each operation by wrapping the functions that do it, the
wrappers added here only (segppo itself is unchanged). Every update but the first is kept; the
table gives each operation's median seconds per update.

    python benchmarks/profile_ppo_update.py runs/ppo_vs_trl/spec.json --granularity bandit --updates 3

Labels are `phase / operation`; nested operations (the model body and the entropy/log-prob head
inside a scoring pass; the AdamW step inside DeepSpeed's `step`) are indented under what holds them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path


class OpTimes:
    """Seconds per label for the current update; `phase` prefixes the labels."""

    def __init__(self):
        self.phase = "update"
        self.current: dict[str, float] = defaultdict(float)
        self.updates: list[dict[str, float]] = []
        self.order: list[str] = []

    def add(self, label: str, seconds: float, phase: str | None = None) -> None:
        key = f"{phase or self.phase} / {label}"
        if key not in self.order:
            self.order.append(key)
        self.current[key] += seconds

    @contextmanager
    def phase_of(self, name: str):
        saved, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = saved

    def wrap(self, owner, name: str, label: str, phase: str | None = None) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                if phase is None:
                    return original(*args, **kwargs)
                with self.phase_of(phase):
                    return original(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start, phase)

        setattr(owner, name, timed)

    def end_update(self, total: float) -> None:
        self.current["update"] = total
        self.updates.append(dict(self.current))
        self.current = defaultdict(float)


def instrument(times: OpTimes, trainer) -> None:
    import segppo.ppo.rollout as rollout
    import segppo.ppo.trainer as trainer_module
    import segppo.segments as segments

    m = trainer.models
    # Phases: the trainer's own steps.
    times.wrap(trainer, "generate", "generation (HF generate, KV cache)", phase="generation")
    times.wrap(trainer_module, "score", "scoring (all passes)", phase="scoring")
    times.wrap(trainer_module, "rewards", "rewards (segments, KL, penalties)", phase="rewards")
    times.wrap(trainer_module, "advantages", "advantages (GAE, whitening)", phase="rewards")
    times.wrap(trainer, "update", "training (all of it)", phase="training")
    if hasattr(trainer, "fit_critic_first"):  # one critic step per epoch: it runs before `update`
        times.wrap(trainer, "fit_critic_first", "training: the critic's first epoch", phase="training")
    # Scoring passes (no grad).
    times.wrap(rollout, "sampled_logprobs_and_entropy", "  actor log-probs + entropy")
    for name in ("reference_logprobs_and_entropy", "logprobs_and_entropy", "segmenter_entropy"):
        if hasattr(rollout, name):  # the reference's pass(es); their names before issue 22 too
            times.wrap(rollout, name, f"  reference ({name})")
    times.wrap(rollout, "critic_values", "  critic values")
    times.wrap(m, "rm_values_fn", "  reward model values")
    # Inside a log-prob pass: the model (the body, plus the LM head unless it is fused) and the
    # entropy/log-prob head (the fused one from hidden states, or the op on the logits).
    times.wrap(segments, "last_logits", "    model forward (+ LM head unless fused)")
    times.wrap(segments, "linear_entropy_logprobs", "    fused entropy/log-prob head, forward")
    times.wrap(segments, "entropy_logprobs", "    entropy/log-probs from the logits, forward")
    if hasattr(segments, "last_hidden"):
        times.wrap(segments, "last_hidden", "    model forward up to the fused head")
    # Training.
    for name in ("_losses", "_policy_loss", "_value_loss"):  # one function before issue 22's end
        if hasattr(trainer, name):
            times.wrap(trainer, name, f"  forward and loss ({name})")
    times.wrap(trainer_module, "logprobs_and_entropy", "    actor forward (log-probs)")
    times.wrap(trainer_module, "critic_values", "    critic forward (values)")
    times.wrap(trainer_module, "policy_loss", "    policy loss")
    times.wrap(trainer_module, "value_loss", "    value loss")
    for role, engine in (("actor", m.actor), ("critic", m.critic)):
        if engine is None:
            continue
        times.wrap(engine, "backward", f"  {role} backward (DeepSpeed engine)")
        times.wrap(engine, "step", f"  {role} step (DeepSpeed engine)")
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
        times.wrap(inner, "step", f"    {role} AdamW step (torch)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="spec.json written by ppo_vs_trl.py")
    parser.add_argument("--granularity", choices=("bandit", "segment"), default="bandit")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the per-update times here")
    parser.add_argument(
        "--torch-profile", type=int, default=0, help="also list the top N torch ops of the last update"
    )
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from segppo.config import PPOConfig
    from segppo.distributed import rank_group
    from segppo.ppo.trainer import PPOTrainer

    with tempfile.TemporaryDirectory(prefix="segppo-profile-") as out, rank_group() as info:
        cfg = PPOConfig(
            policy=spec["model"],
            reward_model=spec[f"rm_{args.granularity}"],
            prompts=spec["prompts"],
            output=out,
            critic_init="rm",
            rollout_batch_size=spec["prompts_per_update"],
            micro_rollout_batch_size=spec["prompts_per_update"],
            train_batch_size=spec["samples_per_step"],
            micro_train_batch_size=spec["micro_batch"],
            ppo_epochs=1,
            max_new_tokens=spec["new_tokens"],
            max_prompt_len=256,
            actor_lr=spec["lr"],
            critic_lr=spec["lr"],
            normalize=False,
            max_steps=args.updates,
            num_logged_samples=0,
            seed=spec["seed"],
            zero_stage=args.zero_stage,
        )
        trainer = PPOTrainer(cfg, info)
        times = OpTimes()
        instrument(times, trainer)
        profile = None
        for step in range(args.updates):
            last = step == args.updates - 1
            if last and args.torch_profile:
                profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profile.__enter__()
            start = time.perf_counter()
            trainer.ppo_step(step)
            times.end_update(time.perf_counter() - start)
            print(f"update {step + 1}: {times.updates[-1]['update']:.2f} s", flush=True)
            if profile is not None:
                profile.__exit__(None, None, None)
            if args.json:  # after every update: a long run killed midway keeps what it measured
                Path(args.json).write_text(json.dumps({"order": times.order, "updates": times.updates}))
    steady = times.updates[1:] or times.updates
    print(
        f"\nsegppo {args.granularity}, --zero-stage {args.zero_stage}: "
        f"median seconds per update over updates 2..{args.updates}"
    )
    for key in ["update", *times.order]:
        values = [u.get(key, 0.0) for u in steady]
        print(f"{statistics.median(values):8.3f}  {key}")
    if profile is not None:
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.torch_profile))


if __name__ == "__main__":
    main()
