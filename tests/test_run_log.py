"""Clean output: the libraries' warnings go to the run's log file; segppo's own stay on the screen."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from segppo.cli.main import app
from typer.testing import CliRunner

import segppo
from segppo.normalizer.core import StdFloorWarning
from segppo.run_log import ENV, library_warnings_to

runner = CliRunner()

SEGPPO_FILE = str(Path(segppo.__file__).parent / "normalizer" / "core.py")
LIBRARY_FILE = str(Path(warnings.__file__))  # any file outside segppo


def test_a_lora_run_prints_no_futurewarning_while_segppo_warnings_still_show(
    tiny_lm_dir, preferences_file, tmp_path
):
    out = tmp_path / "rm"
    args = ["rm", "train", "--model", tiny_lm_dir, "--dataset", preferences_file, "--output", str(out)]
    args += ["--lora-rank", "4", "--max-steps", "2", "--batch-size", "16", "--micro-batch-size", "8"]
    args += ["--max-len", "64", "--max-prompt-len", "32", "--zero-stage", "0", "--eval-fraction", "0.2"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # A library's warning went to the log and not to the screen: peft reading transformers
    # (is_gradient_checkpointing's FutureWarning on current releases; on peft 0.14, the floor,
    # a UserWarning about exclude_modules instead).
    assert "site-packages" not in result.output and "FutureWarning" not in result.output
    log = (out / "run.log").read_text()
    assert re.search(r"site-packages/(peft|transformers)/\S+: \w*Warning", log), log[-1000:]
    assert f"of the libraries (not segppo's) are in {out / 'run.log'}" in " ".join(result.output.split())

    # segppo's own warning (a fit too poor to use: no line reaches R² 1) is still on the screen
    normalizer = tmp_path / "normalizer.json"
    args = ["fit-normalizer", "--reward-model", str(out / "model"), "--dataset", preferences_file]
    args += ["--samples", "24", "--min-bin-count", "2", "--max-len", "64", "--min-r2", "1.0"]
    args += ["--output", str(normalizer)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "PoorFitWarning: R² below min_r2=1 for the mean line" in " ".join(result.output.split())
    library_log = tmp_path / "normalizer.log"
    assert "PoorFit" not in (library_log.read_text() if library_log.exists() else "")


def test_warnings_are_routed_by_where_they_come_from(tmp_path, capsys):
    log = tmp_path / "run" / "run.log"
    with library_warnings_to(log) as router:
        warnings.simplefilter("always")
        warnings.warn_explicit("a library's deprecation", FutureWarning, LIBRARY_FILE, 1)
        warnings.warn_explicit("raised in segppo", UserWarning, SEGPPO_FILE, 1)
        warnings.warn_explicit("segppo's category", StdFloorWarning, LIBRARY_FILE, 2)
        assert os.environ[ENV] == str(log)  # what spawned ranks route by
    screen = capsys.readouterr().err
    # one line each, as segppo's errors: the category and the message, not the source line that warned
    assert screen.splitlines() == ["UserWarning: raised in segppo", "StdFloorWarning: segppo's category"]
    assert "a library's deprecation" not in screen
    assert "a library's deprecation" in log.read_text() and router.count == 1
    assert ENV not in os.environ


def test_without_a_run_folder_nothing_changes(tmp_path):
    before = warnings.showwarning
    with library_warnings_to(None) as router:
        assert router is None and warnings.showwarning is before


def test_a_spawned_rank_routes_as_the_process_that_launched_it(tmp_path, monkeypatch, capsys):
    from segppo.run_log import route_from_environment

    log = tmp_path / "run.log"
    monkeypatch.setenv(ENV, str(log))  # what `library_warnings_to` leaves for `launch`'s ranks
    with warnings.catch_warnings():
        route_from_environment()  # what each spawned rank runs first
        warnings.simplefilter("always")
        warnings.warn_explicit("a library's notice on rank 1", FutureWarning, LIBRARY_FILE, 1)
    assert "rank 1" in log.read_text() and "rank 1" not in capsys.readouterr().err
