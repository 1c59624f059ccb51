"""Progress reaches a log: off a terminal, long loops print one-line records at a steady interval."""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console
from segppo.cli.main import app
from typer.testing import CliRunner

from segppo import tracking
from segppo.tracking import LiveProgress

runner = CliRunner()

CLOCK = r"\d+:\d\d:\d\d"
RECORD = re.compile(
    rf"^(?P<what>[\w -]+?)  (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+)(?P<metrics>.*?)"
    rf"(  tok/s (?P<rate>[\d.e+]+))?  elapsed (?P<elapsed>{CLOCK})  eta (?P<eta>{CLOCK}|\?)$",
    re.M,
)


def records(output: str, what: str) -> list[dict]:
    return [m.groupdict() for m in RECORD.finditer(output) if m["what"] == what]


def test_rm_train_and_fit_normalizer_print_records_in_a_captured_stream(
    tiny_lm_dir, preferences_file, tmp_path
):
    out = tmp_path / "rm"
    args = ["rm", "train", "--model", tiny_lm_dir, "--dataset", preferences_file, "--output", str(out)]
    small = ["--max-steps", "3", "--batch-size", "16", "--micro-batch-size", "8", "--max-len", "64"]
    small += ["--max-prompt-len", "32", "--zero-stage", "0", "--eval-fraction", "0.2"]
    result = runner.invoke(app, args + small, env={"SEGPPO_PROGRESS_INTERVAL": "0"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    steps = records(result.output, "rm train")
    # a record when the loop starts, one per step (interval 0), one when it ends
    assert [int(r["done"]) for r in steps] == [0, 1, 2, 3, 3], result.output
    assert all(r["total"] == "3" and r["unit"] == "steps" for r in steps)
    for r in steps[1:]:
        assert re.search(r"loss [\d.]+  acc [\d.]+", r["metrics"]) and float(r["rate"]) > 0
    assert steps[-1]["eta"] == "0:00:00"

    normalizer = tmp_path / "normalizer.json"
    args = ["fit-normalizer", "--reward-model", str(out), "--dataset", preferences_file, "--samples", "24"]
    args += ["--batch-size", "8", "--max-len", "64", "--output", str(normalizer)]
    result = runner.invoke(app, args, env={"SEGPPO_PROGRESS_INTERVAL": "0"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    batches = records(result.output, "scoring segments")
    assert [int(r["done"]) for r in batches] == [0, 1, 2, 3, 3] and batches[-1]["unit"] == "batches"
    assert "segments" in batches[-1]["metrics"] and float(batches[-1]["rate"]) > 0


def test_records_come_at_a_steady_interval_while_a_step_is_still_running(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(tracking, "console", Console(file=stream, width=80))
    with LiveProgress(10, "ppo", interval=0.05) as progress:
        time.sleep(0.5)  # one long first step: the records keep coming
        assert len(records(stream.getvalue(), "ppo")) >= 4
        progress.update(1, tokens=1000, reward=0.5)
    lines = records(stream.getvalue(), "ppo")
    assert {r["done"] for r in lines[:4]} == {"0"} and lines[-1]["done"] == "1"
    assert "reward 0.5" in lines[-1]["metrics"] and float(lines[-1]["rate"]) > 0
    assert lines[-1]["eta"] != "?"  # nine steps left at the pace of the first
    assert all(len(line) <= 80 for line in stream.getvalue().splitlines())


def test_a_terminal_gets_the_bar_not_records(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(tracking, "console", Console(file=stream, width=120, force_terminal=True))
    with LiveProgress(2, "rm train", interval=0) as progress:
        progress.update(1, tokens=10, loss=0.5)
        progress.update(1, tokens=10, loss=0.25)
    assert records(stream.getvalue(), "rm train") == []
    assert "2/2" in stream.getvalue() and "tok/s" in stream.getvalue()


def test_a_bad_interval_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SEGPPO_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="SEGPPO_PROGRESS_INTERVAL must be a number of seconds, got 'soon'"):
        tracking.progress_interval()
