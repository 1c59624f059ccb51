"""Choosing between the Triton kernels and the plain-torch references.

`SEGPPO_KERNELS=torch` forces the references, `SEGPPO_KERNELS=triton` forces Triton (on CPU tensors
that needs `TRITON_INTERPRET=1`); unset, CUDA tensors take Triton and everything else the reference.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton ships for Linux x86-64 only; elsewhere every op runs its torch reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

_CHOICES = ("torch", "triton")


def kernel_choice() -> str | None:
    """The forced path from `SEGPPO_KERNELS`, or None when unset."""
    value = os.environ.get("SEGPPO_KERNELS", "").strip().lower()
    if not value:
        return None
    if value not in _CHOICES:
        raise ValueError(f"SEGPPO_KERNELS must be one of {_CHOICES}, got {value!r}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` should run its Triton kernel."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError("SEGPPO_KERNELS=triton but triton is not installed")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "SEGPPO_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 "
                "(set it before triton is imported)"
            )
        return True
    return HAS_TRITON and tensor.is_cuda


def device_guard(tensor: torch.Tensor):
    """Context for a kernel launch: the tensor's own GPU made current (Triton launches on the
    current device, so a tensor on another GPU would be read from the wrong one); no-op off CUDA."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
