"""What this installation runs on: versions, devices and the kernel path each op takes."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch
from rich.table import Table

from segppo.kernels._dispatch import HAS_TRITON, kernel_choice

_PACKAGES = ("segppo", "torch", "triton", "transformers", "datasets", "deepspeed")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def kernel_path(device: torch.device) -> str:
    """'triton' or 'torch': the path the ops take for tensors on `device`."""
    choice = kernel_choice()
    if choice is not None:
        return choice
    return "triton" if HAS_TRITON and device.type == "cuda" else "torch"


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
    table.add_row("kernels", f"{kernel_path(device)} on {device.type}")
    return table
