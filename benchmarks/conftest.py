"""Benchmark set-up: records the machine (CPU model, torch/triton versions, GPU) with every result.

Unlike tests/conftest.py this sets no TRITON_INTERPRET: benchmarks time the real paths only.
"""

from __future__ import annotations

import platform

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    machine_info.update(
        cpu_model=_cpu_model(),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        triton_version=triton_version,
        cuda_version=torch.version.cuda,
        gpu=torch.cuda.get_device_name() if cuda else None,
        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    )
