"""Faults: nothing hangs, nothing is lost, one bad rank stops all of them cleanly.

These tests start real `segppo` processes (tiny models, CPU, gloo) and break them the way the
world does: a stale build lock, a `kill -9`, a failing rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


RM_TRAIN = """
import json, sys
from tiny import tiny_rm_config
from segppo.rm.trainer import train_reward_model
model, data, out, overrides = json.loads(sys.argv[1])
train_reward_model(tiny_rm_config(model, data, out, **overrides))
"""


def _rm_train_process(model, data, out, env, **overrides) -> subprocess.Popen:
    """`rm train` of the tiny model in a process of its own (stdout and stderr as text pipes)."""
    argument = json.dumps([model, data, str(out), overrides])
    return subprocess.Popen(
        [sys.executable, "-c", RM_TRAIN, argument],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"still running after {timeout} s:\n{err[-3000:]}")
    return process.returncode, out + err


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_stale_torch_extension_lock_does_not_block_rm_train(tiny_lm_dir, preferences_file, tmp_path, nproc):
    # A run killed while torch's extension builder held its lock leaves the lock file behind;
    # the builder then waits on it forever. segppo must not build DeepSpeed ops on CPU at all.
    home, extensions = tmp_path / "home", tmp_path / "torch_extensions"
    default_root = home / ".cache" / "torch_extensions" / f"py{sys.version_info[0]}{sys.version_info[1]}_cpu"
    for root in (extensions, default_root):
        (root / "deepspeed_shm_comm").mkdir(parents=True)
        (root / "deepspeed_shm_comm" / "lock").write_text("")
    env = _env(tmp_path, HOME=str(home), TORCH_EXTENSIONS_DIR=str(extensions))
    run = _rm_train_process(tiny_lm_dir, preferences_file, tmp_path / "run", env, max_steps=1, nproc=nproc)
    code, output = _finish(run, timeout=240)
    assert code == 0, output[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert "deepspeed_shm_comm" not in output
