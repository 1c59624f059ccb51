"""Faults that stop a run: one rank's bad value or error stops every rank at once, with one clear
error line (also from the command line), and the state on disk is one a resume can trust.

The two-rank tests start real `segppo` runs (tiny models, CPU, gloo) in a process of their own,
with a timeout: a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from segppo.tracking import read_metrics

TESTS = Path(__file__).parent


def _env() -> dict[str, str]:
    rank_variables = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in rank_variables}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    env.update(COLUMNS="400")  # rich wraps at the terminal's width; one error line must stay one line
    return env


def run_with_timeout(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `args` in a session of its own (`_env()` updated with `env`); past `timeout` the whole
    group (spawned ranks too) is killed and the test fails, so a deadlocked run cannot hang the
    test session."""
    process = subprocess.Popen(
        args,
        env={**_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"still running after {timeout} s (a rank is blocked):\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def _cli_args(values: dict) -> list[str]:
    args = [sys.executable, "-m", "segppo.cli", "ppo", "train"]
    for name, value in values.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def reward_model(tiny_lm_dir, preferences_file, tmp_path_factory):
    from tiny import tiny_rm_config

    from segppo.rm.trainer import train_reward_model

    rm = tmp_path_factory.mktemp("rm") / "run"
    train_reward_model(tiny_rm_config(tiny_lm_dir, preferences_file, rm, max_steps=4))
    return str(rm)


# --- a NaN loss on one rank only -----------------------------------------------------------------

SHORT, LONG = "Name the capital.", "What is the capital of France, in one word?"

# Four prompts a step, one per micro-rollout (so scoring never pads), micro-rollout j on rank j mod 2;
# each rank's two responses of a step make one training micro-batch, padded to its longest prompt.
NAN_LOSS_RUN = dict(
    rollout_batch_size=4,
    micro_rollout_batch_size=1,
    train_batch_size=4,
    micro_train_batch_size=2,
    max_new_tokens=6,
    max_prompt_len=48,
    actor_lr=1e-2,
    critic_lr=1e-2,
    critic_init="sft",
    ppo_epochs=1,
    zero_stage=2,
    warmup_ratio=0.0,
    max_steps=2,
    num_logged_samples=2,
    nproc=2,
    seed=0,
)


def _policy_that_is_nan_when_padded(tiny_lm_dir: str, folder: Path) -> str:
    """The tiny policy with a NaN embedding for `<pad>`: a micro-batch that pads gives NaN log-probs
    (attention weighs the pad positions' NaN values by 0, and 0·NaN is NaN), one that does not is
    untouched. It never emits a special token (their head rows are 0 and the others are scaled up,
    so their logit sits far below the top one): every response is `max_new_tokens` long, and only
    prompts of different lengths make a micro-batch pad."""
    from segppo.models import load_tokenizer

    shutil.copytree(tiny_lm_dir, folder)
    special = load_tokenizer(tiny_lm_dir).all_special_ids
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 200.0
    weights["lm_head.weight"][special] = 0.0
    embeddings = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[embeddings][load_tokenizer(tiny_lm_dir).pad_token_id] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def _prompts(path: Path, run: dict, long_row: int | None) -> str:
    """Two steps of SHORT prompts; with `long_row`, rank 1's pool row `long_row` of step 2 is LONG."""
    n = 2 * run["rollout_batch_size"]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(run["seed"])).tolist()
    # Step 2 takes order[n/2:]; one prompt per micro-rollout, micro-rollout j on rank j mod 2, so rank
    # 1's pool (in micro-rollout order) holds order[n/2 + 1], order[n/2 + 3], ...
    long_prompt = order[n // 2 + 1 + 2 * long_row] if long_row is not None else None
    rows = [{"prompt": LONG if i == long_prompt else SHORT} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _second_update_row(run: dict) -> int:
    """A row of rank 1's pool that step 2's second update (of two) trains on (the trainer's order)."""
    from segppo.generation import seed_for

    seed = seed_for(run["seed"], 1, 0, 1)  # (run seed, step 2 counted from 0, epoch 0, rank 1)
    return torch.randperm(4, generator=torch.Generator().manual_seed(seed)).tolist()[2]


# Step 2's first update of rank 1 pads (rows of 2 prompts of different lengths): nothing of the step
# was applied, so the state after step 1 is saved. The critic (a copy of the policy, NaN when padded
# too) is the first to fail there: one update a step, so it trains its epoch before the actor
# (`values_in_update`). With two updates a step and the LONG prompt in the second one, the first
# update has run: nothing is saved, the regular save of step 1 is resumed; each update runs the
# actor first.
STOPS = {
    "before_any_update": (
        NAN_LOSS_RUN,
        "the value loss is not finite; the last good state (after step 1) is saved in {state} "
        "(resume with --resume after fixing the cause)",
    ),
    "after_an_update": (
        {**NAN_LOSS_RUN, "rollout_batch_size": 8, "save_every": 1},
        "the policy loss is not finite; updates of this step had run, so no state was saved; after "
        "fixing the cause, --resume continues from {state}/step-1",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(STOPS))
def test_a_nan_loss_on_one_rank_stops_both_and_resume_continues(tiny_lm_dir, reward_model, tmp_path, moment):
    """Only rank 1's training micro-batch of step 2 pads, so only rank 1's loss is NaN, after both
    ranks finished the rollout. The loss check is collective and comes before any backward of the
    update: both ranks exit with the same error, and the state on disk is one a resume can trust;
    the resume (with prompts that do not pad) ends as a run that never broke."""
    from segppo.config import PPOConfig
    from segppo.ppo.trainer import train_ppo

    run, saved = STOPS[moment]
    long_row = 0 if moment == "before_any_update" else _second_update_row(run)
    policy = _policy_that_is_nan_when_padded(tiny_lm_dir, tmp_path / "policy")
    broken_prompts = _prompts(tmp_path / "broken.jsonl", run, long_row)
    good_prompts = _prompts(tmp_path / "good.jsonl", run, None)
    out = tmp_path / "broken"
    values = dict(policy=policy, reward_model=reward_model, prompts=broken_prompts, output=str(out), **run)

    result = run_with_timeout(_cli_args(values), timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]  # one line, naming the rank that reported first
    state = out / "state"
    expected = f"step 2: {saved.format(state=state)}"
    assert lines[0].startswith("error: rank ") and expected in lines[0], lines[0]
    for rank in (0, 1):  # both ranks raised it themselves (neither was stopped by the other's failure)
        log = (out / f"rank{rank}.error.log").read_text()
        assert f"NonFiniteError: {expected}" in log, log[-2000:]
    assert (state / "latest").read_text().strip() == "step-1"
    assert [r["step"] for r in read_metrics(out, split="train")] == [1]
    assert {json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()} == {1}

    straight = PPOConfig(**{**values, "prompts": good_prompts, "output": str(tmp_path / "straight")})
    train_ppo(straight)
    train_ppo(dataclasses.replace(straight, output=str(out), resume=True))
    want, got = read_metrics(straight.output_dir, split="train"), read_metrics(out, split="train")
    assert [r["step"] for r in got] == [1, 2]
    for w, g in zip(want, got, strict=True):
        for key in ("reward", "kl", "policy_loss", "value_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)
    samples = lambda folder: (folder / "samples.jsonl").read_text().splitlines()  # noqa: E731
    assert samples(out) == samples(straight.output_dir)
    wa = load_file(straight.output_dir / "policy" / "model.safetensors")
    wb = load_file(out / "policy" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, equal_nan=True)


# --- leaving the process group: a clean end waits for every rank, a failed rank does not ----------


def leave_cleanly_while_the_caller_handles_an_error(folder: str) -> None:
    """A rank's body (spawned, so module-level): a clean run inside an `except` block of its caller,
    rank 0 arriving late."""
    import time

    import torch.distributed as dist

    from segppo.distributed import rank_group

    try:
        raise KeyError("the caller's own error, already handled")
    except KeyError:
        with rank_group() as info:
            if info.rank == 0:
                time.sleep(2.0)
            Path(folder, f"arrived{info.rank}").write_text(repr(time.time()))
        left = {"time": time.time(), "group": dist.is_initialized()}
        Path(folder, f"left{info.rank}.json").write_text(json.dumps(left))


def fail_on_rank_1_while_rank_0_waits_for_it(folder: str) -> None:
    import torch.distributed as dist

    from segppo.distributed import rank_group

    with rank_group() as info:
        if info.rank == 1:
            raise ValueError("rank one failed")
        dist.recv(torch.zeros(1), src=1)  # rank 0 waits for rank 1 in an exchange it never joins


def finish_then_crash_in_the_teardown(folder: str) -> None:
    import atexit

    from segppo.distributed import rank_group

    with rank_group() as info:
        Path(folder, f"done{info.rank}").write_text("")
    # A library whose teardown aborts, as gloo's threads left to finalization did now and then.
    atexit.register(os.abort)


LAUNCH = """
import sys
import test_faults_ranks
from segppo.distributed import launch
launch(getattr(test_faults_ranks, sys.argv[1]), sys.argv[2], nproc=2, log_dir=sys.argv[2])
"""


@pytest.mark.slow
def test_a_clean_end_waits_for_every_rank_even_inside_an_except_block(tmp_path):
    result = run_with_timeout(
        [sys.executable, "-c", LAUNCH, "leave_cleanly_while_the_caller_handles_an_error", str(tmp_path)], 180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    arrived0 = float((tmp_path / "arrived0").read_text())
    for rank in (0, 1):
        left = json.loads((tmp_path / f"left{rank}.json").read_text())
        assert left["time"] >= arrived0  # rank 1 waited in the barrier for the late rank 0
        assert not left["group"]  # and the group was torn down


@pytest.mark.slow
def test_a_failed_rank_leaves_at_once_so_its_error_stops_the_run(tmp_path):
    # Had rank 1 waited in a barrier on its way out, rank 0 (in `recv`) and rank 1 would block each
    # other until gloo's timeout, and no error would ever reach `launch`.
    result = run_with_timeout(
        [sys.executable, "-c", LAUNCH, "fail_on_rank_1_while_rank_0_waits_for_it", str(tmp_path)], 180
    )
    assert result.returncode == 1
    log = tmp_path / "rank1.error.log"
    assert f"ValueError: rank 1: rank one failed (traceback in {log})" in result.stderr, result.stderr[-3000:]
    assert "rank one failed" in log.read_text()


def test_a_rank_that_finished_is_not_failed_by_a_crash_in_the_teardown(tmp_path):
    # CI of stop 27: a 2-rank run's rank 0 finished and then died of SIGABRT in Python's teardown
    # ("terminate called without an active exception", gloo's threads); `launch` reported it failed.
    result = run_with_timeout(
        [sys.executable, "-c", LAUNCH, "finish_then_crash_in_the_teardown", str(tmp_path)], 180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "done0").exists() and (tmp_path / "done1").exists()


def test_a_command_under_an_outer_launcher_is_not_failed_by_a_crash_in_the_teardown(tmp_path):
    # The same teardown, in a command that runs as one of torchrun's (or deepspeed's) ranks.
    param_json = tmp_path / "param.json"
    param_json.write_text(json.dumps({"llama": {"prefs": {"peak": {"avg": {"2.0": [-0.5, 0.2, 0.1, 1.3]}}}}}))
    command = "import atexit, os; atexit.register(os.abort); from segppo.cli.main import main; main()"
    args = ["fit-normalizer", "--from-param-json", param_json, "--key", "llama/prefs/peak/avg/2.0"]
    args += ["--output", tmp_path / "normalizer.json"]
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    result = run_with_timeout([sys.executable, "-c", command, *map(str, args)], 120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "normalizer.json").exists()


# --- through the command line: a full disk is one line, the previous state intact -----------------


def test_a_full_disk_is_one_error_line_in_the_cli(tiny_lm_dir, preferences_file, tmp_path, monkeypatch):
    from segppo.cli.main import app
    from typer.testing import CliRunner

    from segppo import state
    from segppo.distributed import latest_state

    out = tmp_path / "run"
    real_disk_usage = state.shutil.disk_usage

    def full_after_the_first_state(path):  # the disk has room for exactly one state
        usage = real_disk_usage(path)
        return usage._replace(free=1024) if latest_state(out / "state") is not None else usage

    monkeypatch.setattr(state.shutil, "disk_usage", full_after_the_first_state)
    args = ["rm", "train", "--model", tiny_lm_dir, "--dataset", preferences_file, "--output", str(out)]
    args += ["--max-steps", "3", "--save-every", "1", "--lr", "3e-3", "--batch-size", "16"]
    args += ["--micro-batch-size", "8", "--max-len", "64", "--max-prompt-len", "32", "--zero-stage", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, OSError)  # handled: not a traceback
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: not enough free space to save the training state in ")
    assert f"the previous state {out / 'state' / 'step-1'} is intact" in errors[0]
    assert latest_state(out / "state").name == "step-1"


@pytest.mark.slow
def test_two_ranks_from_the_cli_show_one_progress_bar_and_no_library_bars(
    tiny_lm_dir, preferences_file, tmp_path
):
    # The command line turns the libraries' bars and load reports off; spawned ranks (rank 0 too)
    # follow it, and only rank 0 draws segppo's own bar, as a one-process run does.
    args = [sys.executable, "-m", "segppo.cli", "rm", "train", "--model", tiny_lm_dir]
    args += ["--dataset", preferences_file, "--output", str(tmp_path / "run"), "--max-steps", "1"]
    args += ["--batch-size", "16", "--micro-batch-size", "8", "--max-len", "64", "--max-prompt-len", "32"]
    args += ["--zero-stage", "0", "--nproc", "2"]
    result = run_with_timeout(args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    # stderr is a pipe, so the bar is one-line records: one start record, from rank 0 alone
    assert len([line for line in lines if line.startswith("rm train  0/1 steps")]) == 1, result.stderr
    assert len([line for line in lines if line.startswith("done:")]) == 1, result.stderr
    for library_output in (
        "Loading weights",
        "LOAD REPORT",
        "Writing model shards",
        "Generating train split",
    ):
        assert library_output not in result.stderr, result.stderr


def crash_on_rank_1(folder: str) -> None:
    """A rank's body: rank 1 fails with an error that is not a user error (a bug, say)."""
    if os.environ["RANK"] == "1":
        raise RuntimeError("an internal error on rank one")


def test_an_internal_error_in_a_spawned_rank_is_one_cli_line_naming_the_rank(tmp_path, capsys):
    import typer
    from segppo.cli.options import run_or_exit

    from segppo.distributed import launch

    with pytest.raises(typer.Exit) as caught:
        run_or_exit(lambda: launch(crash_on_rank_1, str(tmp_path), nproc=2, log_dir=tmp_path))
    assert caught.value.exit_code == 1
    err = capsys.readouterr().err
    log = tmp_path / "rank1.error.log"
    assert err == f"error: rank 1: RuntimeError: an internal error on rank one (traceback in {log})\n"
    assert "Traceback" in log.read_text() and "crash_on_rank_1" in log.read_text()
