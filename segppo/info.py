"""What this installation runs on: versions, devices and the kernel path each op takes."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch
from rich.table import Table

from segppo.kernels._dispatch import use_triton

_PACKAGES = ("segppo", "torch", "triton", "transformers", "datasets", "deepspeed")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def kernel_path(device: torch.device) -> str:
    """'triton' or 'torch': the path the ops take for tensors on `device`, decided as the ops decide
    it; 'none: why' where they refuse to run (a SEGPPO_KERNELS they reject, or one they cannot take)."""
    try:
        return "triton" if use_triton(torch.empty(0, device=device)) else "torch"
    except (ValueError, RuntimeError) as err:
        return f"none: {err}"


def environment_table() -> Table:
    table = Table(title="segppo environment", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for name in _PACKAGES:
        table.add_row(name, _version(name))
    table.add_row("python", platform.python_version())
    table.add_row("cpu", f"{platform.machine()} ({os.cpu_count()} cores)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            table.add_row(f"cuda:{i}", torch.cuda.get_device_name(i))
    else:
        table.add_row("cuda", "not available")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = kernel_path(device)
    table.add_row("kernels", path if path.startswith("none") else f"{path} on {device.type}")
    return table
