"""The trainers' AdamW: fused where torch has the kernel, the same update as the per-tensor loop."""

from __future__ import annotations

import copy

import torch
from segppo.optim import adamw, fused_adamw_supported
from tiny import tiny_config
from transformers import AutoModelForCausalLM


def test_adamw_is_fused_on_cpu_and_updates_as_the_loop_does():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).float()
    looped_model, initial = copy.deepcopy(model), copy.deepcopy(model)
    fused = adamw(model, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"]
    # The same groups (decay on matrices, none on norms and biases) with the per-tensor loop.
    looped = torch.optim.AdamW(
        [
            {"params": [dict(looped_model.named_parameters())[n] for n in names], "weight_decay": g["weight_decay"]}
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
