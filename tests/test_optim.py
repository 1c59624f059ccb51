"""The trainers' AdamW: fused where torch has the kernel, the same update as the per-tensor loop."""

from __future__ import annotations

import copy

import torch
from tiny import tiny_config
from transformers import AutoModelForCausalLM

from segppo.optim import adamw, fused_adamw_supported


def test_adamw_is_fused_on_cpu_and_updates_as_the_loop_does():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).float()
    looped_model, initial = copy.deepcopy(model), copy.deepcopy(model)
    fused = adamw(model, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"]
    # The same groups (decay on matrices, none on norms and biases) with the per-tensor loop.
    looped = torch.optim.AdamW(
        [
            {
                "params": [dict(looped_model.named_parameters())[n] for n in names],
                "weight_decay": g["weight_decay"],
            }
            for g, names in zip(fused.param_groups, _group_names(model, fused), strict=True)
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        foreach=False,
    )
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(model.parameters(), looped_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        looped.step()
    moved = 0.0
    for (name, a), b, start in zip(
        model.named_parameters(), looped_model.parameters(), initial.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        moved += float((a - start).abs().sum())
    assert moved > 0


def _group_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def test_fused_adamw_needs_floating_point_parameters_on_a_supported_device():
    assert fused_adamw_supported([torch.zeros(2)])
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.int64)])
    assert not fused_adamw_supported([torch.zeros(2, device="meta")])
    assert not fused_adamw_supported([])


def test_one_rank_engine_steps_as_plain_torch_does():
    """`--zero-stage 2` on one rank: a stage-0 engine without the one-rank all-reduce, whose
    backward, clipping, AdamW step and schedule give the weights a plain torch loop gives."""
    import types

    from segppo.distributed import init_distributed
    from segppo.optim import cosine_schedule, training_engine

    init_distributed()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).float()
    plain_model = copy.deepcopy(model)
    config = types.SimpleNamespace(
        weight_decay=0.1,
        warmup_ratio=0.0,
        min_lr_ratio=0.1,
        zero_stage=2,
        bf16=False,
        grad_clip=0.5,
        offload_optimizer=False,
    )
    engine, _ = training_engine(
        model, lr=1e-2, total_steps=4, micro_batch_size=2, grad_accum=1, config=config
    )
    assert engine.zero_optimization_stage() == 0 and not engine.enable_backward_allreduce
    optimizer = adamw(plain_model, lr=1e-2, weight_decay=0.1)
    schedule = cosine_schedule(optimizer, total_steps=4, warmup_ratio=0.0, min_lr_ratio=0.1)
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        plain_loss = plain_model(input_ids=ids, labels=ids).loss
        plain_loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 0.5)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, plain_loss)
    for (name, a), b in zip(engine.module.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
