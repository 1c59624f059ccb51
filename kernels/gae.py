"""gae: generalized advantage estimation over response tokens.

Triton: one program per row runs the reverse recurrence in blocks, each block a reverse
associative scan of (decay, value) pairs with the carry from the block after it.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._checks import check_rows
from ._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def _gae_triton(rewards, values, mask, gamma, lam):
    raise NotImplementedError  # filled in by the Triton implementation


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, float32 `[B, T]`, 0 outside the response (DESIGN.md §3.5).

    rewards, values [B, T] float; response_mask [B, T] bool (prefix). Not differentiable.
    """
    mask = check_rows(response_mask, rewards=rewards, values=values)
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 1):
            raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    with torch.no_grad():
        if use_triton(rewards):
            return _gae_triton(rewards, values, mask, float(gamma), float(lam))
        return reference.gae(rewards, values, mask, gamma=float(gamma), lam=float(lam))
