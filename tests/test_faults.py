"""Faults: nothing hangs, nothing is lost, one bad rank stops all of them cleanly.

These tests start real `segppo` processes (tiny models, CPU, gloo) and break them the way the
world does: a stale build lock, a `kill -9`, a failing rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segppo.tracking import read_metrics

TESTS = Path(__file__).parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # Not the rank variables that an in-process run of this test session set for its own group.
    rank_variables = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in rank_variables}
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


# --- Errors read as one line, before the slow start-up -----------------------------------------


def test_a_mistyped_model_folder_offline_says_what_was_tried(preferences_file, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = tiny_rm_config("nomodel", preferences_file, tmp_path / "run")
    with pytest.raises(FileNotFoundError) as caught:
        train_reward_model(cfg)
    message = str(caught.value)
    assert message.startswith(f"--model nomodel: tried the folder {tmp_path / 'nomodel'} (not there)")
    assert "the hub is offline" in message and "\n" not in message
    assert not (tmp_path / "run").exists()  # failed before anything started


def test_a_hub_name_that_cannot_be_found_or_reached_is_one_line(preferences_file, tmp_path, monkeypatch):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    monkeypatch.chdir(tmp_path)
    name = "segppo-tests/no-such-model-7f3a9c"
    with pytest.raises(
        FileNotFoundError, match=f"^--model {name}: tried the folder .* and the hub model"
    ) as caught:
        train_reward_model(tiny_rm_config(name, preferences_file, tmp_path / "run"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dataset", "missing.jsonl", "--dataset missing.jsonl: no such file or folder"),
        ("dataset", "./prefs", "--dataset ./prefs: no such file or folder"),
        ("segmenter", "../segmenter", "--segmenter ../segmenter: no such folder"),
        ("model", "{data}", "is a file, not a model folder"),
    ],
)
def test_missing_paths_are_reported_before_start_up(
    tiny_lm_dir, preferences_file, tmp_path, field, value, message
):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    sources = dict(model=tiny_lm_dir, dataset=preferences_file)
    sources[field] = value.format(data=preferences_file)
    cfg = tiny_rm_config(sources.pop("model"), sources.pop("dataset"), tmp_path / "run", **sources)
    with pytest.raises((FileNotFoundError, NotADirectoryError), match=re.escape(message)):
        train_reward_model(cfg)
    assert not (tmp_path / "run").exists()


def test_a_layout_that_does_not_fit_the_ranks_is_reported_before_start_up(
    tiny_lm_dir, preferences_file, tmp_path
):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    cfg = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", batch_size=8, nproc=2)
    with pytest.raises(ValueError, match="multiple of --micro-batch-size 8 × 2 rank"):
        train_reward_model(cfg)


# --- A failing rank stops every rank ---------------------------------------------------------------


def fail_on_rank_1(step: int, metrics: dict) -> None:
    """A step callback (picklable, for spawned ranks) that breaks rank 1 after its first step."""
    if os.environ["RANK"] == "1" and step == 1:
        raise ValueError("rank one is broken")


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_one_line(tiny_lm_dir, preferences_file, tmp_path):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    cfg = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=20, nproc=2)
    with pytest.raises(ValueError) as caught:
        train_reward_model(cfg, step_callback=fail_on_rank_1)
    log = tmp_path / "run" / "rank1.error.log"
    assert str(caught.value) == f"rank 1: rank one is broken (traceback in {log})"
    assert "Traceback" in log.read_text() and "fail_on_rank_1" in log.read_text()
    assert not (tmp_path / "run" / "model").exists()
    assert len(read_metrics(tmp_path / "run", split="train")) < 20  # rank 0 was stopped, not run to the end


# --- Nothing is lost, nothing is kept twice, old states are pruned -----------------------------------


def test_a_run_resumed_after_its_last_step_logs_each_row_once(tiny_lm_dir, preferences_file, tmp_path):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    cfg = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=2)
    train_reward_model(cfg)
    before = read_metrics(cfg.output_dir)
    train_reward_model(dataclasses.replace(cfg, resume=True))  # e.g. killed during the final export
    after = read_metrics(cfg.output_dir)
    assert [(r["step"], r["split"]) for r in after] == [(r["step"], r["split"]) for r in before]
    assert [(r["step"], r["split"]) for r in after] == [(1, "train"), (2, "train"), (2, "eval")]


def test_a_torn_last_metrics_row_is_dropped_on_resume(tiny_lm_dir, preferences_file, tmp_path):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    cfg = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=3, save_every=1)
    with pytest.raises(Stop):
        train_reward_model(cfg, step_callback=_stop_after(2))
    with (cfg.output_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "split": "tr')  # killed while writing a row
    train_reward_model(dataclasses.replace(cfg, resume=True))
    assert [(r["step"], r["split"]) for r in read_metrics(cfg.output_dir)] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (3, "eval"),
    ]


class Stop(Exception):
    pass


def _stop_after(step: int):
    def callback(done, metrics):
        if done == step:
            raise Stop

    return callback


def test_only_the_newest_states_are_kept(tiny_lm_dir, preferences_file, tmp_path):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    cfg = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=4, save_every=1)
    cfg = dataclasses.replace(cfg, save_total_limit=2)
    train_reward_model(cfg)
    states = sorted(p.name for p in (cfg.output_dir / "state").iterdir())
    assert states == ["latest", "step-3", "step-4"]


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_state(
    tiny_lm_dir, preferences_file, tmp_path, monkeypatch
):
    import shutil

    from tiny import tiny_rm_config

    from segppo import state
    from segppo.distributed import latest_state
    from segppo.rm.trainer import train_reward_model

    cfg = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=3, save_every=1)
    real_disk_usage = shutil.disk_usage

    def disk_fills_after_step_1(path):
        usage = real_disk_usage(path)
        saved = latest_state(cfg.output_dir / "state")
        return usage._replace(free=1024) if saved is not None else usage

    monkeypatch.setattr(state.shutil, "disk_usage", disk_fills_after_step_1)
    with pytest.raises(OSError, match="not enough free space to save the training state") as caught:
        train_reward_model(cfg)
    assert "step-1 is intact" in str(caught.value)
    assert latest_state(cfg.output_dir / "state").name == "step-1"
    assert not any(p.name.endswith(".tmp") for p in (cfg.output_dir / "state").iterdir())
    monkeypatch.undo()
    train_reward_model(dataclasses.replace(cfg, resume=True))
    assert (cfg.output_dir / "model" / "model.safetensors").exists()


# --- kill -9, then --resume: the same weights and metrics as an unbroken run --------------------------


def _kill_when(process: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL `process` as soon as `ready()` is true (polled every few milliseconds)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached the point where it is killed")
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()


def _train_rows(output_dir: Path) -> int:
    """Train rows logged so far (a kill waits for one saved state too, so that there is one to resume)."""
    path = output_dir / "metrics.jsonl"
    return path.read_bytes().count(b'"split": "train"') if path.exists() else 0


def _assert_same_run(got: Path, want: Path, weights: str, keys=("loss", "accuracy", "lr")) -> None:
    from safetensors.torch import load_file

    rows = lambda folder: [(r["step"], r["split"]) for r in read_metrics(folder)]  # noqa: E731
    assert rows(got) == rows(want)
    for g, w in zip(read_metrics(got), read_metrics(want), strict=True):
        for key in keys:
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)
    a, b = load_file(want / weights), load_file(got / weights)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def unbroken_rm_run(tiny_lm_dir, preferences_file, tmp_path_factory):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    cfg = tiny_rm_config(
        tiny_lm_dir, preferences_file, tmp_path_factory.mktemp("unbroken") / "run", **RM_KILL_RUN
    )
    train_reward_model(cfg)
    return cfg


RM_KILL_RUN = dict(max_steps=5, save_every=1, eval_every=2)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["step", "save"])
def test_rm_train_killed_then_resumed_ends_as_an_unbroken_run(unbroken_rm_run, tmp_path, moment):
    from segppo.rm.trainer import train_reward_model

    out = tmp_path / "run"
    run = _rm_train_process(
        unbroken_rm_run.model, unbroken_rm_run.dataset, out, _env(tmp_path), **RM_KILL_RUN
    )
    if moment == "step":
        at = random.Random().randint(1, RM_KILL_RUN["max_steps"] - 1)  # a random step; any must do
        _kill_when(run, lambda: _train_rows(out) >= at and (out / "state" / "latest").exists())
    else:  # while the state of step 2 is being written
        _kill_when(run, lambda: (out / "state" / ".step-2.tmp").exists())
    assert not (out / "model").exists()
    train_reward_model(dataclasses.replace(unbroken_rm_run, output=str(out), resume=True))
    _assert_same_run(out, unbroken_rm_run.output_dir, "model/model.safetensors")


PPO_TRAIN = """
import json, sys
from segppo.config import PPOConfig
from segppo.ppo.trainer import train_ppo
train_ppo(PPOConfig(**json.loads(sys.argv[1])))
"""

PPO_KILL_RUN = dict(
    rollout_batch_size=8,
    micro_rollout_batch_size=8,
    train_batch_size=8,
    micro_train_batch_size=8,
    max_new_tokens=8,
    max_prompt_len=48,
    actor_lr=1e-2,
    critic_lr=1e-2,
    critic_init="sft",
    ppo_epochs=1,
    zero_stage=0,
    warmup_ratio=0.0,
    max_steps=4,
    save_every=1,
    seed=0,
)
PPO_KEYS = ("reward", "kl", "entropy", "response_length", "actor_lr", "critic_lr")


@pytest.fixture(scope="module")
def ppo_inputs(tiny_lm_dir, preferences_file, tmp_path_factory):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    rm = tmp_path_factory.mktemp("ppo_rm") / "run"
    train_reward_model(tiny_rm_config(tiny_lm_dir, preferences_file, rm, max_steps=4))
    prompts = tmp_path_factory.mktemp("ppo_prompts") / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["Name the capital.", "Which city?"] * 20)
    )
    return dict(policy=tiny_lm_dir, reward_model=str(rm), prompts=str(prompts))


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["step", "save"])
def test_ppo_train_killed_then_resumed_ends_as_an_unbroken_run(ppo_inputs, tmp_path, moment):
    from segppo.config import PPOConfig
    from segppo.ppo.trainer import train_ppo

    unbroken = PPOConfig(**ppo_inputs, output=str(tmp_path / "unbroken"), **PPO_KILL_RUN)
    train_ppo(unbroken)
    out = tmp_path / "run"
    values = dict(ppo_inputs, output=str(out), **PPO_KILL_RUN)
    run = subprocess.Popen(
        [sys.executable, "-c", PPO_TRAIN, json.dumps(values)],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if moment == "step":
        at = random.Random().randint(1, PPO_KILL_RUN["max_steps"] - 1)  # a random step; any must do
        _kill_when(run, lambda: _train_rows(out) >= at and (out / "state" / "latest").exists())
    else:
        _kill_when(run, lambda: (out / "state" / ".step-2.tmp").exists())
    assert not (out / "policy").exists()
    train_ppo(PPOConfig(**values, resume=True))
    _assert_same_run(out, unbroken.output_dir, "policy/model.safetensors", keys=PPO_KEYS)


# --- bad prompt rows: skipped and counted, or with --strict an error naming the first ---------------


@pytest.mark.parametrize("strict", [False, True])
def test_a_bad_prompt_row_is_counted_or_with_strict_an_error(tiny_lm_dir, tmp_path, capsys, strict):
    from segppo.config import PPOConfig
    from segppo.data import ChatFormat
    from segppo.models import load_tokenizer
    from segppo.ppo.setup import load_prompts

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Name the capital."}, {"prompt": "Which city?"}, {"prompt": None}, {"prompt": 7}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = PPOConfig(
        policy=tiny_lm_dir, reward_model=tiny_lm_dir, prompts=str(prompts), output="x", strict=strict
    )
    chat = ChatFormat(load_tokenizer(tiny_lm_dir))
    if strict:
        with pytest.raises(ValueError, match=r"^--strict: row 2 is malformed: ") as caught:
            load_prompts(cfg, chat)
        assert "\n" not in str(caught.value)
        return
    assert len(load_prompts(cfg, chat)) == 2
    report = " ".join(capsys.readouterr().err.split())
    assert "kept 2 of 4 rows, skipped 2; first reasons: row 2: " in report and "row 3: " in report


ONE_RANK_RUN_THEN_A_CHILD_RUN = """
import os, subprocess, sys
import segppo.distributed as d
child = "import segppo.distributed as d; i = d.init_distributed(); print(i.rank, i.world_size)"
parent = d.init_distributed()
out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=100)
print(parent.rank, parent.world_size, (out.stdout.strip() or out.stderr.strip()).splitlines()[-1])
print(sorted(k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ))
"""


def test_a_one_rank_run_leaves_nothing_for_a_later_process_to_join(tmp_path):
    # A one-process run (a notebook, a script, gpu_check's parent) used to export RANK, WORLD_SIZE
    # and MASTER_PORT for its own group: a process it started later took them for a launcher's and
    # tried to host the store on the parent's port (EADDRINUSE). A one-rank group needs no port.
    out = subprocess.run(
        [sys.executable, "-c", ONE_RANK_RUN_THEN_A_CHILD_RUN],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr[-1500:]
    ranks, exported = out.stdout.strip().splitlines()[-2:]
    assert ranks == "0 1 0 1"
    assert exported == "[]"
