"""Optimizers and learning-rate schedules shared by the trainers."""

from __future__ import annotations

import math

import torch


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on biases and norms (the usual LLM recipe).

    The fused kernel where torch has one for the parameters' device (CPU and CUDA): it updates each
    element in one pass, where the default per-tensor loop makes about ten passes with tensor-sized
    temporaries. On 2 CPU cores a step of a 135M-parameter model took 0.5 s fused against 2.1 s
    looped, and 7.0 s looped over one flat buffer as ZeRO holds it (benchmarks/RESULTS.md, issue 22).
    The update is AdamW's either way (equal to float32 rounding: tests/test_optim.py).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = fused_adamw_supported([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW runs on all of `params` (floating point, on a device it supports)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def cosine_schedule(optimizer, *, total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `min_lr_ratio · lr`.

    Step k (0-based) of W = ceil(warmup_ratio · total) warmup steps uses `lr · (k+1)/(W+1)`, so no
    step runs at lr 0 (transformers' schedule gives step 0 the factor 0/W: the first optimizer step of
    every run with a warmup changed nothing). Step W uses the peak lr, and the cosine reaches its
    floor on the last step. Steps are optimizer steps; DeepSpeed steps the schedule after each.
    """
    total = max(total_steps, 1)
    warmup = min(math.ceil(warmup_ratio * total), total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - 1 - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def left_out_note(items: int, per_step: int, noun: str, step_noun: str, unit: str) -> str | None:
    """A one-line note when `items` do not fill whole steps of `per_step`: each pass (`unit`) takes
    whole steps of its seeded shuffle, so the rest sit out of it (the shuffle decides which)."""
    left = items % per_step
    if not left:
        return None
    return (
        f"{items} {noun} make {items // per_step} {step_noun} of {per_step} per {unit}; {left} {noun} "
        f"sit out each {unit} (its shuffle picks which)"
    )


def planned_steps(per_pass: int, passes: int, max_steps: int | None, unit: str) -> tuple[int, str | None]:
    """Optimizer steps of a run, and a one-line note when `max_steps` goes past the data.

    `max_steps` is the number of steps, as Hugging Face Trainer's `max_steps` (which TRL's trainers
    inherit): it overrides the passes (`--epochs`, `--num-episodes`), stopping early or continuing
    into further passes over the data, which keep their seeded shuffle. Without it: every pass.
    """
    planned = per_pass * passes
    if max_steps is None or max_steps <= planned:
        return (planned if max_steps is None else max_steps), None
    needed = -(-max_steps // per_pass)
    plural = "s" if passes > 1 else ""
    return max_steps, (
        f"--max-steps {max_steps} goes past {passes} {unit}{plural} of {per_pass} steps: training "
        f"continues into {unit} {passes + 1}" + (f" (of {needed})" if needed > passes + 1 else "")
    )


def one_rank_zero_stage(zero_stage: int, *, offload_optimizer: bool, resumes_zero_state: bool = False) -> int:
    """The ZeRO stage a trained model runs: stages 1 and 2 become 0 on a single rank.

    They partition optimizer states and gradients across ranks, so on one rank they partition
    nothing, yet DeepSpeed's stage-1/2 optimizer still keeps a float32 master copy of the weights, a
    gradient partition and reduce buckets: about 2 × 4 B per parameter more than stage 0 (measured
    in benchmarks/RESULTS.md, "PPO host memory"), and copies every gradient into its buckets and
    every updated weight back: a 135M-parameter model's backward + step took 6.4 s under ZeRO-2
    against 2.3 s at stage 0 on 2 CPU cores (RESULTS.md, issue 22). The update is the same AdamW
    either way. An offloaded optimizer needs ZeRO, and stage 3 (partitioned loading) is kept as asked.
    A resume of a state saved under ZeRO (`resumes_zero_state`: an earlier segppo ran one rank at the
    stage asked) keeps the stage too: a stage-0 engine cannot read ZeRO's partitioned optimizer files.
    """
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if zero_stage in (1, 2) and world_size == 1 and not offload_optimizer and not resumes_zero_state:
        return 0
    return zero_stage


def training_engine(
    model: torch.nn.Module,
    *,
    lr: float,
    total_steps: int,
    micro_batch_size: int,
    grad_accum: int,
    config,
    resumes_zero_state: bool = False,
):
    """A DeepSpeed engine with AdamW and the warmup-cosine schedule; `config` gives weight_decay,
    warmup_ratio, min_lr_ratio, zero_stage, bf16, grad_clip and offload_optimizer (the stage the
    engine runs is `one_rank_zero_stage`'s). Returns `(engine, scheduler)`."""
    import deepspeed
    import torch.distributed as dist

    from segppo.distributed import deepspeed_config

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    stage = one_rank_zero_stage(
        config.zero_stage, offload_optimizer=config.offload_optimizer, resumes_zero_state=resumes_zero_state
    )
    optimizer = adamw(model, lr=lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(
        optimizer, total_steps=total_steps, warmup_ratio=config.warmup_ratio, min_lr_ratio=config.min_lr_ratio
    )
    ds_config = deepspeed_config(
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        zero_stage=stage,
        bf16=config.bf16,
        grad_clip=config.grad_clip,
        offload_optimizer=config.offload_optimizer,
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if world_size == 1 and stage == 0 and not config.bf16:
        # The engine's all-reduce after each backward would average every gradient over one rank:
        # a copy of all of them into flat buffers and back, for nothing. (bf16's optimizer keeps
        # it: its gradient-accumulation bookkeeping runs inside that call.)
        engine.enable_backward_allreduce = False
    if stage == 0 and config.bf16:
        # DeepSpeed's stage-0 bf16 optimizer steps once with zero gradients when it is built, to
        # make the optimizer's states: Adam's step count would start at 1 and its bias correction
        # run a step behind (the first update 0.73 × what it should be). Its states start afresh.
        engine.optimizer.optimizer.state.clear()
    return engine, scheduler
