"""`segppo fit-normalizer` end to end on a tiny segment RM (CPU): fit, --into-rm, the kernels reading
the result, points against a direct computation, 2 ranks against 1, param.json import, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from segppo.cli.main import app
from typer.testing import CliRunner

from segppo.config import FitNormalizerConfig, RMConfig
from segppo.data import collate_preferences, encode_preferences, load_rows
from segppo.fit_normalizer import collect_points, fit_normalizer_from_rm
from segppo.kernels import segment_rewards
from segppo.models import SegppoMetadata, load_policy
from segppo.normalizer import Normalizer, equal_count_bins, segment_points
from segppo.rm.scoring import load_scorer
from segppo.rm.trainer import train_reward_model

runner = CliRunner()
# The few-step RM's noisy fits often dip below the std floor; that warning has its own tests.
pytestmark = pytest.mark.filterwarnings("ignore::segppo.normalizer.StdFloorWarning")
SMALL = ["--max-len", "64", "--max-prompt-len", "32"]


def invoke(*args: str):
    return runner.invoke(app, ["fit-normalizer", *map(str, args)], catch_exceptions=False)


def plain(result) -> str:
    """The output with rich's panel borders and line wrapping taken out."""
    return " ".join(result.output.replace("│", " ").split())


@pytest.fixture(scope="module")
def segmenter_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny LM with its logits scaled ×50: entropies spread over ~0.4-2.2 nats, so threshold 2
    ends ~15% of tokens (segments of several tokens) and few entropies sit near the threshold."""
    model = load_policy(tiny_lm_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    folder = tmp_path_factory.mktemp("segmenter")
    model.save_pretrained(folder)
    shutil.copy(f"{tiny_lm_dir}/tokenizer.json", folder)
    shutil.copy(f"{tiny_lm_dir}/tokenizer_config.json", folder)
    return str(folder)


@pytest.fixture(scope="module")
def segment_rm(tiny_lm_dir, segmenter_dir, preferences_file, tmp_path_factory):
    """A segment RM trained for 3 steps; returns its run folder."""
    cfg = RMConfig(
        model=tiny_lm_dir,
        dataset=preferences_file,
        output=str(tmp_path_factory.mktemp("rm") / "run"),
        segmenter=segmenter_dir,
        entropy_threshold=2.0,
        lr=3e-3,
        batch_size=16,
        micro_batch_size=8,
        max_steps=3,
        max_len=64,
        max_prompt_len=32,
        zero_stage=0,
        eval_fraction=0.2,
        seed=0,
    )
    train_reward_model(cfg)
    return cfg.output_dir


@pytest.fixture
def rm_copy(segment_rm, tmp_path):
    """A private copy of the RM's model folder, for tests that change it."""
    return shutil.copytree(segment_rm / "model", tmp_path / "rm")


def test_fit_end_to_end_and_the_kernels_read_it(segment_rm, preferences_file, tmp_path):
    config = tmp_path / "fit.yaml"
    config.write_text("samples: 99\nmin-bin-count: 2\n")  # the explicit --samples wins
    out = tmp_path / "out" / "normalizer.json"
    result = invoke(
        "--reward-model", segment_rm, "--dataset", preferences_file, "--output", out,
        "--samples", 40, "--config", config, *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Location-aware normalizer" in result.output and "ln p" in result.output

    saved = json.loads(out.read_text())
    assert len(saved["params"]) == 4 and all(math.isfinite(x) for x in saved["params"])
    assert saved["source"] == "fit" and saved["granularity"] == "segment" and saved["threshold"] == 2.0
    assert saved["data"]["pairs"] == 40 and saved["data"]["rows"] == 40 and saved["data"]["seed"] == 42
    assert saved["num_responses"] == 2 * saved["data"]["pairs"]
    assert saved["num_samples"] > saved["num_responses"]  # several segments per response
    assert saved["dataset"] == preferences_file and saved["data"]["dataset"] == preferences_file
    assert saved["reward_model"] == str(segment_rm.resolve())
    assert saved["min_bin_count"] == 2 and saved["sigma_floor"] == 1e-2
    assert sum(b["count"] for b in saved["bins"]) == saved["num_samples"]
    assert any(b["used"] for b in saved["bins"]) and saved["r2_mean"] is not None

    # PPO's reward computation consumes it.
    normalizer = Normalizer.load(out)
    scorer = load_scorer(str(segment_rm))
    pairs, _ = encode_preferences(
        load_rows(preferences_file, max_samples=4), scorer.tokenizer, max_len=64, max_prompt_len=32
    )
    batch = collate_preferences(pairs, scorer.tokenizer.pad_token_id)
    scored = scorer.score(batch)
    rewards = segment_rewards(
        scored.rm_values,
        scored.entropy,
        batch.response_mask,
        threshold=2.0,
        has_eos=batch.has_eos,
        normalizer=normalizer.as_kernel_params(),
        sigma_floor=normalizer.sigma_floor,
    ).rewards
    assert rewards.shape == batch.response_mask.shape and torch.isfinite(rewards).all()
    assert rewards[batch.response_mask].abs().sum() > 0


def test_the_file_names_its_segmenter_from_any_working_directory(
    segment_rm, segmenter_dir, preferences_file, tmp_path, monkeypatch
):
    """A --segmenter given as a relative path (the recorded one moved) is recorded absolute, as the
    reward model and the dataset are: normalizer.json outlives the working directory."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(segmenter_dir, tmp_path / "moved")
    result = invoke(
        "--reward-model", segment_rm, "--dataset", preferences_file, "--segmenter", "moved",
        "--samples", 8, "--min-bin-count", 2, *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "normalizer.json").read_text())
    assert saved["data"]["segmenter"] == str(tmp_path / "moved")


def test_into_rm_updates_segppo_json_only(rm_copy, preferences_file, tmp_path):
    before = json.loads((rm_copy / "segppo.json").read_text())
    out = tmp_path / "normalizer.json"
    result = invoke(
        "--reward-model", rm_copy, "--dataset", preferences_file, "--output", out, "--samples", 8,
        "--into-rm", *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    after = json.loads((rm_copy / "segppo.json").read_text())
    assert after["normalizer"] == json.loads(out.read_text())
    assert {k: v for k, v in after.items() if k != "normalizer"} == {
        k: v for k, v in before.items() if k != "normalizer"
    }
    assert SegppoMetadata.load(rm_copy / "segppo.json").normalizer["params"] == after["normalizer"]["params"]
    assert not list(rm_copy.glob(".*tmp"))  # the atomic write left nothing behind
    # The RM now carries its normalizer: the scorer reads it back.
    assert load_scorer(str(rm_copy)).metadata.normalizer["params"] == after["normalizer"]["params"]


def test_collected_points_match_a_direct_computation(segment_rm, tmp_path):
    from tiny import write_preferences

    data = write_preferences(tmp_path / "three.jsonl", n=3, seed=5, words=12)
    out = tmp_path / "n.json"
    cfg = FitNormalizerConfig(
        reward_model=str(segment_rm), dataset=data, output=str(out), samples=3, min_bin_count=1,
        max_len=64, max_prompt_len=32,
    )  # fmt: skip
    normalizer = fit_normalizer_from_rm(cfg)

    # By hand: each pair alone, scored and segmented with the same functions RM training uses.
    scorer = load_scorer(str(segment_rm))
    pairs, _ = encode_preferences(
        load_rows(data), scorer.tokenizer, max_len=64, max_prompt_len=32, chat_template=scorer.chat.template
    )
    ps, rs = [], []
    for pair in pairs:
        batch = collate_preferences([pair], scorer.tokenizer.pad_token_id)
        scored = scorer.score(batch)
        p, r = segment_points(
            scored.rm_values, scored.entropy, batch.response_mask,
            granularity="segment", threshold=2.0, has_eos=batch.has_eos,
        )  # fmt: skip
        ps.append(p.numpy())
        rs.append(r.numpy())
    p, r = np.concatenate(ps), np.concatenate(rs)
    assert len(p) > 2 * len(pairs)  # more than one segment per response

    assert normalizer.num_samples == len(p) and normalizer.num_responses == 6
    expected = equal_count_bins(p, r, min_count=1)  # the default fit mode's bins
    assert [b["p"] for b in normalizer.bins] == [b["p"] for b in expected]
    assert [b["count"] for b in normalizer.bins] == [b["count"] for b in expected]
    for got, want in zip(normalizer.bins, expected, strict=True):
        assert got["mean"] == pytest.approx(want["mean"], abs=1e-5)
        assert got["std"] == pytest.approx(want["std"], abs=1e-5)

    # Batched (padded) collection gives the same points as one pair at a time.
    collected_p, collected_r = collect_points(scorer, pairs, batch_size=2).arrays()
    order, expected_order = np.lexsort((collected_r, collected_p)), np.lexsort((r, p))
    np.testing.assert_array_equal(collected_p[order], p[expected_order])
    np.testing.assert_allclose(collected_r[order], r[expected_order], atol=1e-5)


def test_two_ranks_give_the_same_fit_as_one(segment_rm, preferences_file, tmp_path):
    common = dict(
        reward_model=str(segment_rm), dataset=preferences_file, samples=24, min_bin_count=2,
        max_len=64, max_prompt_len=32,
    )  # fmt: skip
    one = fit_normalizer_from_rm(FitNormalizerConfig(**common, output=str(tmp_path / "one.json")))
    two = fit_normalizer_from_rm(FitNormalizerConfig(**common, output=str(tmp_path / "two.json"), nproc=2))
    assert two.extra["data"]["pairs"] == one.extra["data"]["pairs"] == 24
    assert two.num_samples == one.num_samples
    assert [(b["p"], b["count"]) for b in two.bins] == [(b["p"], b["count"]) for b in one.bins]
    assert two.params == pytest.approx(one.params, rel=1e-4, abs=1e-6)
    assert two.score_mean == pytest.approx(one.score_mean, abs=1e-6)


@pytest.mark.parametrize("granularity", ["token", "bandit"])
def test_imported_rm_with_granularity(rm_copy, preferences_file, tmp_path, granularity):
    (rm_copy / "segppo.json").unlink()  # a plain token-classification folder, as if imported
    out = tmp_path / "n.json"
    result = invoke(
        "--reward-model", rm_copy, "--dataset", preferences_file, "--output", out, "--samples", 16,
        "--granularity", granularity, "--min-bin-count", 1, *SMALL,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = Normalizer.load(out)
    assert saved.granularity == granularity and saved.num_responses == 32
    if granularity == "bandit":  # one score per response: the global [0, 0, mean, std]
        assert saved.source == "bandit" and saved.num_samples == 32
        assert saved.params[:2] == (0.0, 0.0) and saved.params[2:] == (saved.score_mean, saved.score_std)
    else:
        assert saved.source == "fit" and saved.num_samples > 32


PARAM_JSON = {
    "phi3-instruct": {
        "preference700k_60000": {
            "peak": {"avg": {"1.75": [-0.5, 0.2, 0.1, 1.3], "0": [-0.1, 0.3, -0.2, 1.9]}},
        }
    }
}


@pytest.fixture
def param_json(tmp_path):
    path = tmp_path / "param.json"
    path.write_text(json.dumps(PARAM_JSON))
    return path


def test_param_json_import_and_list_keys(param_json, tmp_path):
    result = invoke("--from-param-json", param_json, "--list-keys")
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [
        "phi3-instruct/preference700k_60000/peak/avg/1.75",
        "phi3-instruct/preference700k_60000/peak/avg/0",
    ]
    out = tmp_path / "imported.json"
    result = invoke(
        "--from-param-json", param_json, "--key", "phi3-instruct/preference700k_60000/peak/avg/1.75",
        "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    imported = Normalizer.load(out)
    assert imported.params == (-0.5, 0.2, 0.1, 1.3) and imported.source == "param.json"
    assert imported.granularity == "segment" and imported.threshold == 1.75
    assert imported.reward_model == "phi3-instruct" and imported.dataset == "preference700k_60000"
    # "0" is the paper's token level
    invoke("--from-param-json", param_json, "--key", "phi3-instruct/preference700k_60000/peak/avg/0.0",
           "--output", out)  # fmt: skip
    assert Normalizer.load(out).granularity == "token"


def test_an_output_folder_gets_normalizer_json_and_the_cli_names_that_file(param_json, tmp_path):
    # The file went inside the folder, but the last line named the folder and the run's log went
    # beside it (FOLDER.log), not beside normalizer.json.
    folder = tmp_path / "norm"
    folder.mkdir()
    key = "phi3-instruct/preference700k_60000/peak/avg/1.75"
    result = invoke("--from-param-json", param_json, "--key", key, "--output", folder)
    assert result.exit_code == 0, result.output
    assert Normalizer.load(folder / "normalizer.json").threshold == 1.75
    assert "".join(result.stdout.split()).endswith(f"→{folder / 'normalizer.json'}")  # lines wrap


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    return plain(result)


def test_param_json_key_errors(param_json, tmp_path):
    key = "phi3-instruct/preference700k_60000/peak/avg/2"
    text = _error(invoke("--from-param-json", param_json, "--key", key))
    assert "no threshold '2'" in text and "available: 1.75, 0" in text
    text = _error(invoke("--from-param-json", param_json, "--key", "llama/x"))
    assert "no model 'llama'" in text and "phi3-instruct" in text
    assert "needs --key" in _error(invoke("--from-param-json", param_json))
    missing = _error(invoke("--from-param-json", tmp_path / "missing.json", "--list-keys"))
    assert "no such file" in missing.lower()


def test_input_errors(segment_rm, rm_copy, preferences_file, tmp_path):
    fit = lambda rm, data, *more: invoke(  # noqa: E731
        "--reward-model", rm, "--dataset", data, "--output", tmp_path / "n.json", *SMALL, *more
    )
    assert "no such folder" in _error(fit(tmp_path / "missing", preferences_file))
    assert "--samples must be a positive integer" in _error(fit(segment_rm, preferences_file, "--samples", 0))
    assert "--reward-model and --dataset" in _error(invoke("--dataset", preferences_file))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in _error(fit(segment_rm, empty))
    unusable = tmp_path / "unusable.jsonl"
    unusable.write_text('{"question": "hi", "answer": "there"}\n')
    assert "no usable preference rows" in _error(fit(segment_rm, unusable))

    text = _error(fit(rm_copy, preferences_file, "--granularity", "token", "--into-rm"))
    assert "records granularity segment" in text  # a fit of another segmentation stays out of the RM

    (rm_copy / "segppo.json").unlink()
    text = _error(fit(rm_copy, preferences_file))
    assert "does not record the reward model's granularity" in text and "--granularity" in text
    text = _error(fit(rm_copy, preferences_file, "--granularity", "token", "--into-rm"))
    assert "has no segppo.json" in text
    assert not (tmp_path / "n.json").exists()  # nothing was written by any of these


def test_plot(segment_rm, preferences_file, tmp_path):
    args = ["--reward-model", segment_rm, "--dataset", preferences_file, "--output", tmp_path / "n.json"]
    result = invoke(*args, "--samples", 8, "--plot", tmp_path / "fit.png", *SMALL)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"


def test_sampled_rows_keep_their_numbers_in_the_file():
    # fit-normalizer scores a seeded sample of the rows, split across ranks: a skipped row is still
    # named by its number in the split, not by its place in the sample or the rank's share.
    from datasets import Dataset

    from segppo.data import to_preference_examples
    from segppo.fit_normalizer import sample_rows, shard_bounds

    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    rows = Dataset.from_list([{**good, "rejected": None} if i in (5, 9) else good for i in range(12)])
    sample = sample_rows(rows, 8, seed=0)
    start, stop = shard_bounds(len(sample), 1, 2)
    skipped = [
        reason
        for part in (sample.select(range(start)), sample.select(range(start, stop)))
        for reason in to_preference_examples(part)[1].reasons
    ]
    picked = sorted(np.random.default_rng(0).permutation(12)[:8].tolist())
    assert skipped == [f"row {i}: missing 'rejected'" for i in picked if i in (5, 9)] != []


def test_skipped_and_truncated_rows_are_reported(segment_rm, tmp_path):
    # As rm train reports them: the skipped rows with their first reasons, and the rows cut to fit
    # (a cut response has lost its stop, so its last segment is not the response's end).
    bad_rows = Path(__file__).resolve().parent / "data" / "preferences_with_bad_rows.jsonl"
    out = tmp_path / "normalizer.json"
    result = invoke("--reward-model", segment_rm, "--dataset", bad_rows, "--output", out, *SMALL)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())["data"]
    assert data["truncated_prompts"] >= 1 and data["skipped_rows"] == 2
    text = plain(result)
    assert "2 rows skipped; first reasons: row 2: prompt is empty; row 5: missing 'rejected'" in text
    truncated = f"{data['truncated_prompts']} prompts and {data['truncated_responses']} responses truncated"
    assert truncated in text


def test_param_json_refused_by_the_rm_writes_nothing(param_json, rm_copy, tmp_path):
    # The segment RM records threshold 2.0; the entry is for 1.75: refused before --output is written.
    key = "phi3-instruct/preference700k_60000/peak/avg/1.75"
    out = tmp_path / "imported.json"
    before = (rm_copy / "segppo.json").read_text()
    text = _error(invoke("--from-param-json", param_json, "--key", key, "--output", out,
                         "--into-rm", "--reward-model", rm_copy))  # fmt: skip
    assert "--into-rm: the normalizer is for segment (threshold 1.75)" in text
    assert not out.exists() and (rm_copy / "segppo.json").read_text() == before
