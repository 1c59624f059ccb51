"""entropy_logprobs: per-token entropy and target log-probs in one pass over the vocabulary.

Triton: one program per row streams the vocabulary in blocks with an online softmax (running max,
Σexp, Σx·exp), so logits are read once in their own dtype and no float32 copy is made.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_float
from ._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def _entropy_logprobs_triton(logits, targets, temperature):
    raise NotImplementedError  # filled in by the Triton implementation


def entropy_logprobs(
    logits: torch.Tensor, targets: torch.Tensor | None = None, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy of softmax(logits / temperature) and log-probs of `targets`.

    logits [..., V] any float dtype; targets [...] integer or None. Returns float32 `(entropy [...],
    logprobs [...] | None)`, both differentiable w.r.t. logits. NaN logits give NaN.
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
            raise ValueError("targets must be an integer tensor of token ids")
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets has shape {tuple(targets.shape)} but logits [..., V] needs "
                f"{tuple(logits.shape[:-1])}"
            )
        if targets.device != logits.device:
            raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
        targets = targets.long()
    if use_triton(logits):
        return _entropy_logprobs_triton(logits, targets, float(temperature))
    return reference.entropy_logprobs(logits, targets, temperature=float(temperature))
