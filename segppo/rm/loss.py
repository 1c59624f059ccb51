"""The reward model's pairwise loss: small pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of `-log σ(s_chosen − s_rejected − margin)` over pairs; `[B]` scores in, scalar out."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen response scores strictly higher."""
    return (chosen > rejected).float().mean()
