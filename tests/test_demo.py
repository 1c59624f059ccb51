"""`segppo demo --budget small` end to end: task data → rm train → fit-normalizer → ppo → eval."""

from __future__ import annotations

import json

from segppo.cli.main import app
from typer.testing import CliRunner


def test_demo_small_budget_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--budget", "small", "--output", str(out), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    (setting,) = summary["settings"]
    assert setting["granularity"] == "segment" and setting["num_prompts"] >= 256
    for key in ("sft_gold", "ppo_gold", "gold_win_rate", "rm_accuracy"):
        assert isinstance(setting[key], float), key
    assert 0.0 <= setting["gold_win_rate"] <= 1.0 and 0.0 <= setting["rm_accuracy"] <= 1.0
    assert set(setting["seconds"]) == {"rm train", "fit-normalizer", "ppo train", "eval"}
    assert len(setting["curve"]) == len([r for r in setting["curve"] if "gold_reward" in r]) > 0
    # every stage left its artifacts, through the same code paths as the commands
    assert (out / "rm" / "model" / "model.safetensors").exists()
    assert json.loads((out / "rm" / "model" / "segppo.json").read_text())["normalizer"]["params"]
    assert (out / "rm" / "normalizer.json").exists()
    assert (out / "ppo" / "policy" / "model.safetensors").exists()
    assert (out / "eval" / "results.json").exists() and (out / "eval_gold" / "results.json").exists()
    assert (out / "rewards_across_ppo_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "gold reward" in result.output


def test_demo_compare_granularities(tmp_path):
    out = tmp_path / "compare"
    args = [
        "demo",
        "--budget",
        "small",
        "--compare",
        "bandit,segment",
        "--output",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert [s["granularity"] for s in settings] == ["bandit", "segment"]
    assert (out / "bandit" / "seed-0" / "ppo" / "policy" / "model.safetensors").exists()
    assert not (out / "bandit" / "seed-0" / "rm" / "normalizer.json").exists()  # bandit: score mean/std
    assert "per reward granularity" in result.output


def test_demo_rejects_unknown_granularity():
    result = CliRunner().invoke(app, ["demo", "--compare", "sentence"])
    assert result.exit_code == 2
