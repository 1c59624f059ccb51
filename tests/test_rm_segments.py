"""What `rm train` measures and records of its segments, and `--entropy-threshold auto` (issue 20 item 2)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_cli import invoke
from tiny import tiny_rm_config as rm_config

from segppo.config import RMConfig
from segppo.models import SegppoMetadata
from segppo.rm.trainer import train_reward_model
from segppo.segment_stats import DEFAULT_SEGMENT_LENGTH
from segppo.tracking import read_metrics


def _metadata(cfg) -> SegppoMetadata:
    return SegppoMetadata.load(cfg.output_dir / "model" / "segppo.json")


def test_auto_is_the_default_and_gives_the_target_length(tiny_lm_dir, preferences_file, tmp_path):
    assert RMConfig(model="m", dataset="d", output="o").entropy_threshold == "auto"
    cfg = rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=1)
    target = DEFAULT_SEGMENT_LENGTH
    train_reward_model(cfg)
    meta = _metadata(cfg)
    choice, stats = meta.threshold_choice, meta.segment_stats
    assert choice["rule"] == "auto" and choice["segment_length"] == target and 0 < choice["quantile"] < 1
    assert meta.threshold == choice["threshold"]
    assert stats["sample_pairs"] == 256 and stats["responses"] == 512 == choice["responses"]
    # On the sample τ was chosen on: the target, up to one segment of rounding.
    assert stats["tokens"] / (stats["segments"] + 1) <= target <= stats["tokens"] / (stats["segments"] - 1)
    assert stats["p10_length"] <= stats["median_length"] <= stats["p90_length"]
    # On the held-out pairs, which τ was not chosen on: close to the target too.
    final = read_metrics(cfg.output_dir, split="eval")[-1]
    assert final["segment_length"] == pytest.approx(target, rel=0.25)
    record = json.loads((cfg.output_dir / "run_config.json").read_text())
    assert record["entropy_threshold"] == "auto" and record["segmentation"]["threshold"] == meta.threshold


def test_a_given_threshold_near_token_level_warns(tiny_lm_dir, preferences_file, tmp_path, capsys):
    # The random-weight model's entropy is about ln(384) = 5.95 everywhere: τ = 1 ends every token.
    cfg = rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", entropy_threshold=1.0, max_steps=1)
    train_reward_model(cfg)
    err = capsys.readouterr().err
    assert "segments are near token level (1.00 tokens per segment" in err
    meta = _metadata(cfg)
    assert meta.threshold == 1.0 and meta.threshold_choice == {"rule": "given"}
    assert meta.segment_stats["mean_length"] == 1.0 and meta.segment_stats["p90_length"] == 1.0

    model = str(cfg.output_dir)
    result = invoke("rm", "inspect", "--model", model, "--prompt", "Name the capital.", "--response", "Paris")
    assert result.exit_code == 0, result.output
    assert "threshold given" in result.stdout
    assert "training data: 1.00 tokens per segment" in result.stdout and "near token level" in result.stdout


def test_a_threshold_near_bandit_level_warns(tiny_lm_dir, preferences_file, tmp_path, capsys):
    cfg = rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", entropy_threshold=50.0, max_steps=1)
    train_reward_model(cfg)
    assert "segments are near bandit level (1.00 segments per response" in capsys.readouterr().err


def test_resume_keeps_the_threshold_auto_chose(tiny_lm_dir, preferences_file, tmp_path):
    """`auto` chooses once: a resumed run reads τ back from run_config.json instead of choosing again."""
    cfg = rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=2, save_every=1)

    class Stop(Exception):
        pass

    def stop(step, metrics):
        if step == 1:
            raise Stop

    with pytest.raises(Stop):
        train_reward_model(cfg, step_callback=stop)
    path = cfg.output_dir / "run_config.json"
    record = json.loads(path.read_text())
    record["segmentation"]["threshold"] = 5.5  # what a second choice would not give
    path.write_text(json.dumps(record))
    train_reward_model(dataclasses.replace(cfg, resume=True))
    assert _metadata(cfg).threshold == 5.5


@pytest.mark.parametrize("value", ["auto", "AUTO", "2.5", 2.5, "0", "1000"])
def test_threshold_values(value):
    cfg = RMConfig(model="m", dataset="d", output="o", entropy_threshold=value)
    assert cfg.entropy_threshold == ("auto" if str(value).lower() == "auto" else float(value))


@pytest.mark.parametrize("value", ["high", "-1", "nan", "inf"])
def test_bad_threshold_values(value):
    with pytest.raises(ValueError, match="--entropy-threshold must be a number >= 0 or auto"):
        RMConfig(model="m", dataset="d", output="o", entropy_threshold=value)


def test_paper_presets_keep_their_threshold():
    from segppo.presets import RM_PRESETS

    for name, preset in RM_PRESETS.items():
        cfg = RMConfig(output="o", **preset)
        assert cfg.entropy_threshold == (1.75 if name.startswith("phi3") else 2.0), name
