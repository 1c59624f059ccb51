"""Training on one rank holds no ZeRO-1/2 buffers (issue 20 item 7): DeepSpeed's stage-1/2 optimizer
partitions nothing on one rank but still keeps a float32 master copy of the weights, gradient
partitions and reduce buckets, so one rank runs stage 0, with the same numerics."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config
from transformers import AutoModelForCausalLM

from segppo.config import RMConfig
from segppo.distributed import deepspeed_config, init_distributed
from segppo.optim import adamw, cosine_schedule, training_engine

STEPS = 3


def _train(build) -> tuple[object, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    engine = build(model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = torch.randint(4, 60, (2, 12), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    return engine, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_one_rank_runs_zero_2_as_stage_0_with_the_same_weights():
    import deepspeed

    init_distributed()
    cfg = RMConfig(model="m", dataset="d", output="o", zero_stage=2, grad_clip=0.5, weight_decay=0.1)
    kw = dict(lr=1e-2, total_steps=STEPS, micro_batch_size=2, grad_accum=1, config=cfg)
    ours, trained = _train(lambda model: training_engine(model, **kw)[0])
    assert ours.zero_optimization_stage() == 0

    def zero2(model):  # what training_engine built on one rank before
        optimizer = adamw(model, lr=1e-2, weight_decay=0.1)
        schedule = cosine_schedule(optimizer, total_steps=STEPS, warmup_ratio=0.03, min_lr_ratio=0.1)
        ds = deepspeed_config(micro_batch_size=2, grad_accum=1, zero_stage=2, bf16=False, grad_clip=0.5)
        return deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds)[0]

    theirs, expected = _train(zero2)
    assert theirs.zero_optimization_stage() == 2
    torch.manual_seed(0)
    initial = AutoModelForCausalLM.from_config(tiny_config()).state_dict()
    assert not torch.equal(initial["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


def test_offload_keeps_its_zero_stage_on_one_rank():
    init_distributed()
    cfg = RMConfig(model="m", dataset="d", output="o", zero_stage=2, offload_optimizer=True)
    engine, _ = training_engine(
        AutoModelForCausalLM.from_config(tiny_config()),
        lr=1e-3,
        total_steps=1,
        micro_batch_size=1,
        grad_accum=1,
        config=cfg,
    )
    assert engine.zero_optimization_stage() == 2 and engine.zero_cpu_offload()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_at_stage_0_starts_adam_at_its_first_step(zero_stage):
    """DeepSpeed's stage-0 bf16 optimizer (what --bf16 runs on one rank under --zero-stage 0, 1 or
    2) steps once with zero gradients when it is built; Adam's step count then started at 1 and
    its bias correction ran a step behind (the first update was 0.73 × ZeRO-2's)."""
    import deepspeed

    init_distributed()
    cfg = RMConfig(model="m", dataset="d", output="o", zero_stage=zero_stage, bf16=True)
    kw = dict(lr=1e-2, total_steps=STEPS, micro_batch_size=2, grad_accum=1, config=cfg)
    ours, trained = _train(lambda model: training_engine(model, **kw)[0])
    assert ours.zero_optimization_stage() == 0

    def zero2(model):
        optimizer = adamw(model, lr=1e-2, weight_decay=0.0)
        schedule = cosine_schedule(optimizer, total_steps=STEPS, warmup_ratio=0.03, min_lr_ratio=0.1)
        ds = deepspeed_config(micro_batch_size=2, grad_accum=1, zero_stage=2, bf16=True, grad_clip=1.0)
        return deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds)[0]

    _, expected = _train(zero2)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=2e-4)
