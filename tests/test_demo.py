"""`segppo demo --budget small` end to end: task data → rm train → fit-normalizer → ppo → eval."""

from __future__ import annotations

import json

import pytest
from segppo.cli.main import app
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One SFT policy cache for the module: the compare test reuses the policy the first one trained."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("single") / "demo"
    args = ["demo", "--budget", "small", "--output", str(out), "--cache-dir", str(cache_dir)]
    return out, CliRunner().invoke(app, args, catch_exceptions=False)


def test_demo_small_budget_end_to_end(single_run):
    out, result = single_run
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    (setting,) = summary["settings"]
    assert setting["granularity"] == "segment" and setting["num_prompts"] >= 256
    # read in a log (a non-terminal stream, 80 columns): progress records of each stage, tables whole
    from test_progress import records

    for stage in ("rm train", "scoring segments", "ppo"):
        assert records(result.output, stage), stage
    assert "…" not in result.output and "SFT gold" in result.output
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


def test_demo_compare_granularities(tmp_path, cache_dir, single_run):
    out = tmp_path / "compare"
    args = [
        "demo",
        "--budget",
        "small",
        "--compare",
        "bandit,segment",
        "--seeds",
        "2",
        "--output",
        str(out),
        "--cache-dir",
        str(cache_dir),
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    settings = summary["settings"]
    # seed by seed, every granularity on each seed: the per-seed rows of the paired comparison
    assert [(s["granularity"], s["seed"]) for s in settings] == [
        ("bandit", 0), ("segment", 0), ("bandit", 1), ("segment", 1)
    ]  # fmt: skip
    assert (out / "bandit" / "seed-0" / "ppo" / "policy" / "model.safetensors").exists()
    assert not (out / "bandit" / "seed-0" / "rm" / "normalizer.json").exists()  # bandit: score mean/std
    for s in settings:
        assert -1.0 <= s["local_credit"] <= 1.0, s["local_credit"]
        assert s["ppo_length"] > 0 and s["sft_length"] > 0
        assert s["rm_accuracy_curve"][-1]["accuracy"] == s["rm_accuracy"]
        assert len(s["rm_accuracy_curve"]) >= 2  # measured during training, not only at the end
    (diff,) = summary["paired_differences"]
    assert (diff["a"], diff["b"], diff["seeds"]) == ("bandit", "segment", [0, 1])
    gains = {(s["granularity"], s["seed"]): s["ppo_gold"] - s["sft_gold"] for s in settings}
    assert diff["per_seed"] == [gains["bandit", k] - gains["segment", k] for k in (0, 1)]
    assert diff["se"] >= 0
    run = summary["run"]
    assert (
        run["seeds"] == [0, 1]
        and run["threads"] >= 1
        and {"torch", "transformers", "segppo"} <= set(run["versions"])
    )
    assert summary["is_comparison"] is False and "not a comparison" in result.output
    assert "per reward granularity" in result.output and "paired differences" in result.output
    # Reproducible: segment seed 0 here is the single run's setting (same budget, seed, SFT policy,
    # data, RM epochs and threads), so it gives the same numbers.
    single = json.loads((single_run[0] / "results.json").read_text())["settings"][0]
    again = next(s for s in settings if (s["granularity"], s["seed"]) == ("segment", 0))
    for key in ("rm_accuracy", "local_credit", "sft_gold", "ppo_gold", "gold_win_rate", "ppo_length"):
        assert again[key] == single[key], key


@pytest.mark.parametrize(
    "args, run",
    [([], "rm"), (["--seeds", "2"], "segment/seed-1/ppo"), (["--model", "smollm2"], "rm")],
)
def test_demo_refuses_an_earlier_demo_output_before_any_work(tmp_path, args, run):
    """A second `segppo demo` into the same --output (the default segppo-demo) found the first's
    rm/ and stopped there ('already holds a run; pass --resume', which demo has not) after the task
    data and SFT; it is refused first, in one line."""
    out, cache = tmp_path / "demo", tmp_path / "cache"
    (out / run).mkdir(parents=True)
    (out / run / "metrics.jsonl").write_text("{}\n")
    result = CliRunner().invoke(
        app, ["demo", "--budget", "small", *args, "--output", str(out), "--cache-dir", str(cache)]
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"--output {out}: {out / run} holds an earlier demo's run" in message, message
    assert not cache.exists()  # no SFT policy trained, no model fetched


def test_demo_refuses_a_file_as_its_output(tmp_path):
    out, cache = tmp_path / "results.json", tmp_path / "cache"
    out.write_text("{}")
    result = CliRunner().invoke(
        app, ["demo", "--budget", "small", "--output", str(out), "--cache-dir", str(cache)]
    )
    assert result.exit_code == 2, result.output
    assert f"--output {out}: a file, not a folder" in " ".join(result.output.split())
    assert not cache.exists()  # refused before the SFT policy


def test_demo_rejects_unknown_granularity():
    result = CliRunner().invoke(app, ["demo", "--compare", "sentence"])
    assert result.exit_code == 2
