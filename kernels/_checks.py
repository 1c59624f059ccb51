"""Argument checks shared by every op: shapes, dtypes, devices and option values.

Checks look at metadata only (never at tensor values), so they cost no host synchronisation.
Every error is a ValueError that names the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

GRANULARITIES = ("segment", "token", "bandit")
DISTRIBUTES = ("interpolate", "repeat", "end")

# The paper's CLI encodes granularity in the threshold: 0 is token-level, 1000 is bandit.
TOKEN_THRESHOLD = 0.0
BANDIT_THRESHOLD = 1000.0


def resolve_granularity(granularity: str, threshold: float) -> str:
    """Validate `granularity`/`threshold` and map the paper's sentinel thresholds (0, 1000)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    threshold = float(threshold)
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold}")
    if granularity == "segment":
        if threshold == TOKEN_THRESHOLD:
            return "token"
        if threshold == BANDIT_THRESHOLD:
            return "bandit"
    return granularity


def check_distribute(distribute: str) -> None:
    if distribute not in DISTRIBUTES:
        raise ValueError(f"distribute must be one of {DISTRIBUTES}, got {distribute!r}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_rows(
    response_mask: torch.Tensor, has_eos: torch.Tensor | None = None, **per_token: torch.Tensor
) -> torch.Tensor:
    """Check `[B, T]` per-token tensors against `response_mask`; returns the mask as bool."""
    if not isinstance(response_mask, torch.Tensor):
        raise ValueError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be 2-D [B, T], got shape {tuple(response_mask.shape)}")
    if response_mask.is_floating_point() or response_mask.is_complex():
        raise ValueError(f"response_mask must be bool or integer, got dtype {response_mask.dtype}")
    for name, tensor in per_token.items():
        check_float(name, tensor)
        if tensor.shape != response_mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but response_mask has "
                f"{tuple(response_mask.shape)}; both must be [B, T]"
            )
        if tensor.device != response_mask.device:
            raise ValueError(f"{name} is on {tensor.device} but response_mask is on {response_mask.device}")
    if has_eos is not None:
        if not isinstance(has_eos, torch.Tensor):
            raise ValueError(f"has_eos must be a torch.Tensor or None, got {type(has_eos).__name__}")
        if has_eos.shape != response_mask.shape[:1]:
            raise ValueError(
                f"has_eos has shape {tuple(has_eos.shape)} but must be [B] = [{response_mask.shape[0]}]"
            )
        if has_eos.is_floating_point() or has_eos.is_complex():
            raise ValueError(f"has_eos must be bool or integer, got dtype {has_eos.dtype}")
        if has_eos.device != response_mask.device:
            raise ValueError(f"has_eos is on {has_eos.device} but response_mask is on {response_mask.device}")
    return response_mask.bool()


def check_normalizer(normalizer: Sequence[float] | torch.Tensor | None, sigma_floor: float):
    """Return the normalizer as a tuple `(a, b, c, d)` of floats, or None."""
    if not (isinstance(sigma_floor, (int, float)) and sigma_floor > 0 and math.isfinite(sigma_floor)):
        raise ValueError(f"sigma_floor must be a positive finite number, got {sigma_floor!r}")
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.detach().flatten().tolist()
    params = tuple(float(x) for x in normalizer)
    if len(params) != 4:
        raise ValueError(f"normalizer must be [a, b, c, d] (4 numbers), got {len(params)}")
    if not all(math.isfinite(x) for x in params):
        raise ValueError(f"normalizer must be finite, got {list(params)}")
    return params
