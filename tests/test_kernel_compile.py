"""Every Triton kernel variant the launchers pass compiles for real GPUs (sm_80, sm_90) without
spilling, on a machine without a GPU; and every launcher launches on its tensor's own device.

The compile check runs benchmarks/kernel_resources.py (the project's AOT driver: a stand-in
driver, launches turned into compiles, ptxas from the triton wheel) in a subprocess per target,
both at once: compiling needs the real JIT, which this process cannot have because conftest set
TRITON_INTERPRET=1 before triton was imported.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from segppo.kernels._dispatch import HAS_TRITON, device_guard

from segppo.kernels import entropy_logprobs, gae, segment_rewards, sequence_scores

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_resources.py"
ARCHS = (80, 90)
KERNEL_MODULES = ("entropy", "gae", "rewards")


def _ptxas():
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


needs_ptxas = pytest.mark.skipif(
    not HAS_TRITON or not _ptxas().exists(), reason="ptxas (shipped in the triton wheel) is absent"
)


def _triton_prints_ptxas_report() -> bool:
    import triton
    from packaging.version import Version

    return Version(triton.__version__) >= Version("3.5")


# The spill check reads ptxas's register/spill report, which triton prints from 3.5 on
# (triton.knobs.nvidia.dump_ptxas_log); 3.4 has triton.knobs without that knob, older ones no knobs.
needs_ptxas_report = pytest.mark.skipif(
    not HAS_TRITON or not _triton_prints_ptxas_report(),
    reason="the spill check reads ptxas's register report, which triton>=3.5 prints",
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """arch -> (rows of the resource report, stderr), compiled in parallel subprocesses."""
    out = tmp_path_factory.mktemp("kernel_compile")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    procs = {}
    for arch in ARCHS:
        env_arch = dict(env, TRITON_CACHE_DIR=str(out / f"cache{arch}"))
        report = str(out / f"{arch}.json")
        cmd = [sys.executable, str(SCRIPT), "--arch", str(arch), "--no-sass", "--json", report]
        procs[arch] = subprocess.Popen(
            cmd, env=env_arch, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    results = {}
    for arch, proc in procs.items():
        _, stderr = proc.communicate(timeout=900)
        path = out / f"{arch}.json"
        rows = json.loads(path.read_text()) if path.exists() else []
        results[arch] = (proc.returncode, rows, stderr.decode()[-5000:])
    return results


def _launchable_kernels() -> set[str]:
    """Names of the kernels (jit functions named *_kernel) in the kernel modules."""
    names = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"segppo.kernels.{module_name}")
        names |= {name for name in vars(module) if name.startswith("_") and name.endswith("_kernel")}
    return names


@needs_ptxas
@needs_ptxas_report
@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles_without_spills(compiled, arch):
    returncode, rows, stderr = compiled[arch]
    assert rows, f"sm_{arch}: the compile run produced no report:\n{stderr}"
    failures = [
        f"{r['variant']}: {r['error'].splitlines()[0]}"
        if "error" in r
        else f"{r['variant']}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
        for r in rows
        if "error" in r or r["spill_stores"] or r["spill_loads"] or r["stack"]
    ]
    assert not failures, f"sm_{arch}:\n" + "\n".join(failures)
    assert returncode == 0, stderr


@needs_ptxas
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_and_vocabulary_is_covered(compiled, arch):
    _, rows, stderr = compiled[arch]
    assert {r.get("kernel") for r in rows} == _launchable_kernels(), stderr
    for vocab in (32000, 50257, 128256, 152064):
        for dtype in ("fp32", "bf16", "fp16"):
            tags = [r["variant"] for r in rows if f" {dtype} V={vocab} " in r["variant"]]
            assert len(tags) == 5, (vocab, dtype, tags)  # fwd with/without targets, 3 backward flags


# --------------------------------------------------------------------------------------------
# Device guards: Triton launches on the current device, so each launcher makes its tensor's
# device current. On CPU the guard is a no-op; the test checks that every launcher enters it.


def test_device_guard_is_a_no_op_off_cuda():
    before = torch.cuda.current_device() if torch.cuda.is_available() else None
    with device_guard(torch.zeros(1)):
        if before is not None:
            assert torch.cuda.current_device() == before


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_guard_makes_the_tensors_device_current():
    x = torch.zeros(1, device="cuda:1")
    with torch.cuda.device(0), device_guard(x):
        assert torch.cuda.current_device() == 1


def _ops(device):
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    values = torch.randn(2, 5, device=device)
    logits = torch.randn(3, 11, device=device, requires_grad=True)
    return {
        "entropy": lambda: (
            entropy_logprobs(logits, torch.zeros(3, dtype=torch.long, device=device))[1].sum().backward()
        ),
        "rewards": lambda: segment_rewards(values, values, mask, threshold=0.5),
        "rewards_scores": lambda: sequence_scores(values, values, mask, granularity="segment", threshold=0.5),
        "gae": lambda: gae(values, values, mask),
    }


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("op", ["entropy", "rewards", "rewards_scores", "gae"])
def test_every_launcher_enters_the_device_guard(monkeypatch, device, op):
    monkeypatch.setenv("SEGPPO_KERNELS", "triton")
    module = importlib.import_module(f"segppo.kernels.{op.split('_')[0]}")
    guarded = []

    def recording_guard(tensor):
        guarded.append(tensor.device)
        return device_guard(tensor)

    monkeypatch.setattr(module, "device_guard", recording_guard)
    _ops(device)[op]()
    expected = 2 if op == "entropy" else 1  # forward and backward
    assert [d.type for d in guarded] == [torch.device(device).type] * expected
