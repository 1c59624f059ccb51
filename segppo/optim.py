"""Optimizers and learning-rate schedules shared by the trainers."""

from __future__ import annotations

import math

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on biases and norms (the usual LLM recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def cosine_schedule(optimizer, *, total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `min_lr_ratio · lr`."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1), min_lr_rate=min_lr_ratio
    )


def one_rank_zero_stage(zero_stage: int, *, offload_optimizer: bool) -> int:
    """The ZeRO stage a trained model runs: stages 1 and 2 become 0 on a single rank.

    They partition optimizer states and gradients across ranks, so on one rank they partition
    nothing, yet DeepSpeed's stage-1/2 optimizer still keeps a float32 master copy of the weights, a
    gradient partition and reduce buckets: about 2 × 4 B per parameter more than stage 0 (measured
    in benchmarks/RESULTS.md, "PPO host memory"). The update is the same AdamW either way. An
    offloaded optimizer needs ZeRO, and stage 3 (partitioned loading) is kept as asked.
    """
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if zero_stage in (1, 2) and world_size == 1 and not offload_optimizer:
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
):
    """A DeepSpeed engine with AdamW and the warmup-cosine schedule; `config` gives weight_decay,
    warmup_ratio, min_lr_ratio, zero_stage, bf16, grad_clip and offload_optimizer. Returns
    `(engine, scheduler)`."""
    import deepspeed

    from segppo.distributed import deepspeed_config

    optimizer = adamw(model, lr=lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(
        optimizer, total_steps=total_steps, warmup_ratio=config.warmup_ratio, min_lr_ratio=config.min_lr_ratio
    )
    ds_config = deepspeed_config(
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        zero_stage=one_rank_zero_stage(config.zero_stage, offload_optimizer=config.offload_optimizer),
        bf16=config.bf16,
        grad_clip=config.grad_clip,
        offload_optimizer=config.offload_optimizer,
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, scheduler
