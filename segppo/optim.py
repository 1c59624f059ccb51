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
        zero_stage=config.zero_stage,
        bf16=config.bf16,
        grad_clip=config.grad_clip,
        offload_optimizer=config.offload_optimizer,
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, scheduler
