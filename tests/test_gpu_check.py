"""benchmarks/gpu_check.py on a machine without a GPU: its CPU mode (the correctness part on tiny
sizes, Triton interpreted), --help, the one-line no-CUDA exit, and that its comparison flags errors."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run_script(*args, **env):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_and_the_no_cuda_exit():
    assert run_script("--help").returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = run_script("--no-bench")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("gpu_check: no CUDA device")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cpu_quick_correctness_passes():
    proc = run_script("--device", "cpu", "--quick", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    counts = proc.stdout.split("correctness: ")[1].split()[0]
    passed, total = map(int, counts.split("/"))
    assert passed == total > 100


def test_the_comparison_flags_errors_nan_and_inf_mismatches():
    checks = load_module().Checks()
    want = torch.tensor([1.0, -math.inf, math.nan, 2.0])
    checks.close("same", want.clone(), want, 1e-6)
    checks.close("off", want + torch.tensor([0.0, 0.0, 0.0, 1e-3]), want, 1e-6)
    checks.close("nan lost", torch.tensor([1.0, -math.inf, 0.0, 2.0]), want, 1e-6)
    checks.close("inf lost", torch.tensor([1.0, 0.0, math.nan, 2.0]), want, 1e-6)
    checks.equal("ends", torch.tensor([True, False]), torch.tensor([True, True]))
    assert [ok for *_, ok in checks.rows] == [True, False, False, False, False]
