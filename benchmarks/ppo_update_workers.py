"""The subprocesses of `ppo_vs_trl.py`: one system's PPO updates, timed, written as JSON.

    python benchmarks/ppo_update_workers.py {segppo-bandit|segppo-segment|trl|floor} SPEC UPDATES OUT

`SPEC` is the spec.json that `ppo_vs_trl.prepare` wrote; `SEGPPO_BENCH_THREADS` sets torch's threads.
`trl` imports TRL (run it with the python of TRL's environment); the others need only segppo's.
OUT gets `update_s` (one entry per update; the first includes start-up and is warm-up) and, per
system, what else it measured.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def segppo_updates(spec: dict, granularity: str, updates: int) -> dict:
    from segppo.config import PPOConfig
    from segppo.ppo.trainer import train_ppo

    marks, phases = [time.perf_counter()], []

    def on_update(step: int, metrics: dict) -> None:
        marks.append(time.perf_counter())
        phases.append({k: v for k, v in metrics.items() if k.startswith("time_") or k == "tokens"})

    with tempfile.TemporaryDirectory(prefix="segppo-bench-") as out:
        cfg = PPOConfig(
            policy=spec["model"],
            reward_model=spec[f"rm_{granularity}"],
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
            normalize=False,  # a fresh head: no fitted normalizer; the time is the same
            max_steps=updates,
            num_logged_samples=0,
            seed=spec["seed"],
        )
        train_ppo(cfg, step_callback=on_update)
    return {
        "update_s": [b - a for a, b in zip(marks, marks[1:], strict=False)],
        "phases": phases,
        "tokens": [p["tokens"] for p in phases],
    }


def trl_updates(spec: dict, updates: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    marks, eos_counts = [time.perf_counter()], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "val/num_eos_tokens" in logs:
                eos_counts.append(logs["val/num_eos_tokens"])

    torch.manual_seed(spec["seed"])
    model = spec["model"]
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    # TRL reads a sequence-classification head (`score`) on the backbone; segppo's RM folder holds it.
    value_model = AutoModelForSequenceClassification.from_pretrained(
        spec["rm_bandit"], num_labels=1, dtype=torch.float32
    )
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        spec["rm_bandit"], num_labels=1, dtype=torch.float32
    )
    n = spec["prompts_per_update"]
    rows = spec["prompt_ids"][: n * updates]
    dataset = Dataset.from_dict({"input_ids": rows})
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        config = PPOConfig(
            output_dir=out,
            # TRL's rollout is per_device_train_batch_size × gradient_accumulation_steps prompts, cut
            # into num_mini_batches mini-batches of micro-batches. Its accelerator accumulates over
            # gradient_accumulation_steps micro-batches, so it takes one optimizer step per epoch
            # whatever num_mini_batches is: with samples_per_step 4 (2 mini-batches of one
            # micro-batch) still one step over all 8, not two.
            per_device_train_batch_size=spec["micro_batch"],
            gradient_accumulation_steps=n // spec["micro_batch"],
            num_mini_batches=n // spec["samples_per_step"],
            local_rollout_forward_batch_size=n,
            num_ppo_epochs=1,
            response_length=spec["new_tokens"],
            temperature=1.0,
            stop_token="eos",
            total_episodes=n * updates,
            learning_rate=spec["lr"],
            num_sample_generations=0,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            bf16=False,
            use_cpu=True,
            seed=spec["seed"],
            dataloader_num_workers=0,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
            callbacks=[Timer()],
        )
        trainer.train()
    # TRL trains on all `new_tokens` columns of every response (masked after a stop token).
    return {"update_s": [b - a for a, b in zip(marks, marks[1:], strict=False)], "eos_tokens": eos_counts}


class Batch:
    """A generated batch for the floor's passes: sequences, their mask and positions, responses."""

    def __init__(self, seq, attention_mask, response, prompt_len):
        self.seq, self.attention_mask, self.response, self.prompt_len = (
            seq,
            attention_mask,
            response,
            prompt_len,
        )
        self.positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, batch: Batch, rows):
    """Log-probs of the response tokens: the LM head on the response columns only."""
    import torch

    logits = model(
        input_ids=batch.seq[rows],
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.positions[rows],
        logits_to_keep=batch.response.shape[1] + 1,
        use_cache=False,
    ).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(2, batch.response[rows, :, None]).squeeze(-1)


def values(model, batch: Batch, rows):
    """A token-classification model's values at the states before each response token."""
    return model(
        input_ids=batch.seq[rows],
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.positions[rows],
    ).logits[:, batch.prompt_len - 1 : -1, 0]


def floor_updates(spec: dict, updates: int) -> dict:
    """The bare passes of an update (see ppo_vs_trl.py), each timed; plain transformers and torch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, GenerationConfig

    torch.manual_seed(spec["seed"])
    dtype = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval().requires_grad_(False)
    critic = AutoModelForTokenClassification.from_pretrained(spec["rm_bandit"], dtype=dtype)
    reward = AutoModelForTokenClassification.from_pretrained(spec["rm_bandit"], dtype=dtype)
    reward.eval().requires_grad_(False)
    # torch's fused AdamW: the cheapest form of the step (one pass over each parameter).
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=spec["lr"], fused=True)
    critic_opt = torch.optim.AdamW(
        [p for p in critic.parameters() if p.requires_grad], lr=spec["lr"], fused=True
    )
    pad, n, T = spec["pad_token_id"], spec["prompts_per_update"], spec["new_tokens"]
    generation = GenerationConfig(
        max_new_tokens=T,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_token_id=spec["stop_token_ids"],
        pad_token_id=pad,
    )
    marks, parts, tokens = [time.perf_counter()], [], []
    for update in range(updates):
        rows = spec["prompt_ids"][update * n : (update + 1) * n]
        P = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows])
        mask = (torch.arange(P)[None, :] >= torch.tensor([P - len(r) for r in rows])[:, None]).long()
        times: dict[str, float] = {}

        def timed(name, fn, *args, times=times, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
            return out

        policy.eval()
        with torch.no_grad():
            seq = timed(
                "generation",
                policy.generate,
                input_ids=ids,
                attention_mask=mask,
                generation_config=generation,
            )
        # Tokens after a row's stop are padding (masked), as every system treats them.
        response = seq[:, P:]
        stop = torch.isin(response, torch.tensor(spec["stop_token_ids"]))
        after = (stop.long().cumsum(-1) - stop.long()) > 0
        batch = Batch(seq, torch.cat([mask, (~after).long()], dim=1), response, P)
        tokens.append(int((~after).sum()))
        everything = slice(None)
        with torch.no_grad():
            timed("reference forward", response_logprobs, reference, batch, everything)
            timed("reward model forward", values, reward, batch, everything)
        policy.train()
        critic.train()
        step, micro = spec["samples_per_step"], spec["micro_batch"]
        for start in range(0, n, step):
            for first in range(start, start + step, micro):  # gradients accumulate over micro-batches
                part = slice(first, first + micro)
                kept = ~after[part]
                logprobs = timed("policy forward", response_logprobs, policy, batch, part)
                timed("policy backward", torch.Tensor.backward, (logprobs * kept).sum().neg())
                value = timed("critic forward", values, critic, batch, part)
                timed("critic backward", torch.Tensor.backward, ((value * kept) ** 2).sum())
            timed("policy optimizer step", actor_opt.step)
            timed("critic optimizer step", critic_opt.step)
            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
        parts.append(times)
        marks.append(marks[-1] + sum(times.values()))  # the floor is the sum of its passes
    return {
        "update_s": [b - a for a, b in zip(marks, marks[1:], strict=False)],
        "parts_s": parts,
        "tokens": tokens,
    }


def main(argv: list[str]) -> None:
    system, spec_file, updates, out = argv
    spec = json.loads(Path(spec_file).read_text())
    threads = int(os.environ.get("SEGPPO_BENCH_THREADS", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)
    updates = int(updates)
    if system in ("segppo-bandit", "segppo-segment"):
        result = segppo_updates(spec, system.split("-")[1], updates)
    elif system == "trl":
        result = trl_updates(spec, updates)
    elif system == "floor":
        result = floor_updates(spec, updates)
    else:
        raise SystemExit(f"unknown system {system!r}")
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
