"""Fused ops of segppo: entropy, segment rewards, sequence scores and GAE.

Each op dispatches to its Triton kernel for CUDA tensors and to the plain-torch reference in
`segppo.kernels.reference` otherwise; `SEGPPO_KERNELS=torch|triton` forces a path. Imports torch
and triton only (and segppo._layout, the standard library only). The op modules are in the
repository's top-level kernels/ folder; why this file is not there: segppo/_layout.py.
"""

from segppo._layout import with_checkout_folder

__path__ = with_checkout_folder(__path__, "kernels", "entropy.py")

# ruff: noqa: E402

from ._checks import DISTRIBUTES, GRANULARITIES, resolve_granularity
from .entropy import entropy_logprobs
from .gae import gae
from .reference import SegmentRewards
from .rewards import segment_rewards, sequence_scores

__all__ = [
    "DISTRIBUTES",
    "GRANULARITIES",
    "SegmentRewards",
    "entropy_logprobs",
    "gae",
    "resolve_granularity",
    "segment_rewards",
    "sequence_scores",
]
