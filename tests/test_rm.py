"""Reward-model training, evaluation and inspection on tiny models (CPU, DeepSpeed with gloo)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stopping import stop_at_step
from tiny import tiny_rm_config as rm_config
from transformers import AutoModelForTokenClassification

from segppo.config import RMEvalConfig
from segppo.models import SegppoMetadata
from segppo.rm.evaluate import evaluate_reward_model, inspect_response
from segppo.rm.scoring import load_scorer
from segppo.rm.trainer import train_reward_model
from segppo.tracking import read_metrics


@pytest.fixture(scope="module")
def trained_rm(tiny_lm_dir, preferences_file, tmp_path_factory):
    """A segment RM trained for 2 epochs on the Paris/Lyon preference set (320 train, 80 held out)."""
    cfg = rm_config(
        tiny_lm_dir, preferences_file, tmp_path_factory.mktemp("rm") / "run", epochs=2, eval_every=10
    )
    train_reward_model(cfg)
    return cfg


def test_segment_rm_learns_local_content(trained_rm):
    final = read_metrics(trained_rm.output_dir, split="eval")[-1]
    assert final["num_pairs"] == 80  # 20% of 400 held out
    assert final["accuracy"] >= 0.9
    train = read_metrics(trained_rm.output_dir, split="train")
    assert [row["step"] for row in train] == list(range(1, 41))
    assert train[-1]["loss"] < train[0]["loss"]
    assert len(read_metrics(trained_rm.output_dir, split="eval")) == 4  # steps 10, 20, 30 and the end


def test_checkpoint_loads_with_plain_transformers(trained_rm):
    folder = trained_rm.output_dir / "model"
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    model = AutoModelForTokenClassification.from_pretrained(folder)
    assert model.config.num_labels == 1
    meta = SegppoMetadata.load(folder / "segppo.json")
    assert meta.kind == "reward_model" and meta.granularity == "segment"
    assert meta.threshold_choice["rule"] == "auto" and meta.threshold == meta.threshold_choice["threshold"]
    assert meta.segmenter == trained_rm.model
    assert meta.data["train_pairs"] == 320 and meta.data["eval_pairs"] == 80
    final = read_metrics(trained_rm.output_dir, split="eval")[-1]
    assert meta.score_mean == pytest.approx(final["score_mean"])
    assert meta.score_std == pytest.approx(final["score_std"]) and meta.score_std > 0
    assert "<|im_start|>" in meta.chat_template
    run_config = json.loads((trained_rm.output_dir / "run_config.json").read_text())
    assert run_config["granularity"] == "segment" and run_config["lr"] == trained_rm.lr


def test_rm_eval_uses_only_held_out_rows(trained_rm, preferences_file):
    stats = evaluate_reward_model(
        RMEvalConfig(
            model=str(trained_rm.output_dir), dataset=preferences_file, max_len=64, max_prompt_len=32
        )
    )
    assert stats["num_pairs"] == 80 and "held out" in stats["rows"]
    final = read_metrics(trained_rm.output_dir, split="eval")[-1]
    assert stats["accuracy"] == pytest.approx(final["accuracy"])
    assert stats["chosen_score"] == pytest.approx(final["chosen_score"], rel=1e-4)


def test_rm_eval_on_another_dataset_uses_all_rows(trained_rm, tmp_path):
    from tiny import write_preferences

    other = write_preferences(tmp_path / "other.jsonl", n=24, seed=7)
    stats = evaluate_reward_model(RMEvalConfig(model=str(trained_rm.output_dir), dataset=other, max_len=64))
    assert stats["num_pairs"] == 24 and stats["accuracy"] >= 0.9


@pytest.mark.parametrize("max_samples", [0, -1])
def test_rm_eval_max_samples_must_be_positive(max_samples):
    # It used to select no rows and fail on the layout ("column 'chosen' holds NoneType ... keys []").
    with pytest.raises(ValueError, match=f"--max-samples must be a positive integer, got {max_samples}"):
        RMEvalConfig(model="m", dataset="d", max_samples=max_samples)


def test_rm_eval_names_the_dataset_it_could_not_read(trained_rm, tmp_path):
    # rm eval said only "no usable preference rows: there are no rows at all", naming no file.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(empty))}: no usable preference rows"):
        evaluate_reward_model(RMEvalConfig(model=str(trained_rm.output_dir), dataset=str(empty)))


def test_rm_eval_reports_truncated_rows(trained_rm):
    # As rm train and fit-normalizer report them: a pair cut to --max-len is not scored as written.
    bad_rows = Path(__file__).resolve().parent / "data" / "preferences_with_bad_rows.jsonl"
    stats = evaluate_reward_model(
        RMEvalConfig(model=str(trained_rm.output_dir), dataset=str(bad_rows), max_len=48, max_prompt_len=32)
    )
    assert (
        stats["skipped_rows"] == 2 and stats["truncated_prompts"] >= 1 and stats["truncated_responses"] >= 1
    )


def test_a_run_given_relative_paths_is_read_from_another_directory(
    tiny_lm_dir, preferences_file, tmp_path, monkeypatch
):
    # segppo.json records the backbone, segmenter and data as absolute paths: from another working
    # directory the scorer still finds its segmenter, and rm eval still knows its training rows.
    monkeypatch.chdir(tmp_path)
    model, data = os.path.relpath(tiny_lm_dir), os.path.relpath(preferences_file)
    train_reward_model(rm_config(model, data, "run", max_steps=1))
    meta = SegppoMetadata.load(tmp_path / "run" / "model" / "segppo.json")
    assert meta.segmenter == meta.base_model == str(Path(tiny_lm_dir).resolve())
    assert meta.data["dataset"] == str(Path(preferences_file).resolve())
    monkeypatch.chdir(tmp_path.parent)
    stats = evaluate_reward_model(
        RMEvalConfig(model=str(tmp_path / "run"), dataset=preferences_file, max_len=64, max_prompt_len=32)
    )
    assert stats["num_pairs"] == 80 and "held out" in stats["rows"]


def test_rm_inspect_rewards_the_right_segment(trained_rm):
    scorer = load_scorer(str(trained_rm.output_dir / "model"))
    good = inspect_response(scorer, "Name the capital.", "the fox Paris red")
    bad = inspect_response(scorer, "Name the capital.", "the fox Lyon red")
    assert "".join(s.text for s in good).startswith("the fox Paris red")
    assert good[-1].index == 0 and good[-1].text == "<|im_end|>"  # the trailing EOS is in no segment
    segments = [s for s in good if s.index]
    assert [s.index for s in segments] == list(range(1, len(segments) + 1))
    assert all(s.start <= s.end for s in segments)
    mean = lambda views: sum(s.reward for s in views if s.index) / sum(1 for s in views if s.index)  # noqa: E731
    assert mean(good) > mean(bad)


@pytest.mark.parametrize("granularity", ["token", "bandit"])
def test_token_and_bandit_rms_train_without_a_segmenter(tiny_lm_dir, preferences_file, tmp_path, granularity):
    cfg = rm_config(
        tiny_lm_dir, preferences_file, tmp_path / granularity, granularity=granularity, max_steps=3
    )
    train_reward_model(cfg)
    meta = SegppoMetadata.load(cfg.output_dir / "model" / "segppo.json")
    assert meta.granularity == granularity and meta.segmenter is None
    assert len(read_metrics(cfg.output_dir, split="train")) == 3


def test_a_segmenter_given_as_a_relative_path_loads_from_any_folder(
    tiny_lm_dir, preferences_file, tmp_path, monkeypatch
):
    """`rm train --model tiny-lm` (a folder relative to where it runs) records a segmenter that
    eval, fit-normalizer and ppo train load from their own working folder: it must not be relative."""
    from pathlib import Path

    monkeypatch.chdir(Path(tiny_lm_dir).parent)
    cfg = rm_config(Path(tiny_lm_dir).name, preferences_file, tmp_path / "r", max_steps=1)
    train_reward_model(cfg)
    monkeypatch.chdir(tmp_path)
    meta = SegppoMetadata.load(cfg.output_dir / "model" / "segppo.json")
    assert Path(meta.segmenter) == Path(tiny_lm_dir).resolve()
    assert load_scorer(str(cfg.output_dir)).segmenter is not None


def test_a_recorded_segmenter_that_is_gone_is_one_line(trained_rm, tmp_path):
    """An RM whose segmenter folder was moved or deleted (the demo's SFT cache cleared, the run
    copied to another machine) names it and --segmenter, instead of a hub lookup's traceback."""
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(trained_rm.output_dir / "model", rm)
    meta = json.loads((rm / "segppo.json").read_text())
    meta["segmenter"] = str(tmp_path / "cleared-cache" / "sft")
    (rm / "segppo.json").write_text(json.dumps(meta))
    with pytest.raises(
        FileNotFoundError, match=r"records the segmenter .*cleared-cache/sft.*pass --segmenter"
    ):
        load_scorer(str(rm))
    assert load_scorer(str(rm), segmenter=trained_rm.model).segmenter is not None


def test_paper_threshold_sentinels_resolve(tiny_lm_dir, preferences_file, tmp_path):
    cfg = rm_config(tiny_lm_dir, preferences_file, tmp_path / "r", entropy_threshold=1000.0, max_steps=1)
    train_reward_model(cfg)
    assert SegppoMetadata.load(cfg.output_dir / "model" / "segppo.json").granularity == "bandit"


def test_resume_matches_an_uninterrupted_run(tiny_lm_dir, preferences_file, tmp_path):
    base = dict(max_steps=6, save_every=2, zero_stage=2)
    straight = rm_config(tiny_lm_dir, preferences_file, tmp_path / "straight", **base)
    train_reward_model(straight)

    broken = rm_config(tiny_lm_dir, preferences_file, tmp_path / "broken", **base)

    stop_at_step(train_reward_model, broken, 3)
    assert not (broken.output_dir / "model").exists()
    assert (broken.output_dir / "checkpoints" / "step-2" / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train_reward_model(broken)  # a run is there: refuse to overwrite it
    train_reward_model(dataclasses.replace(broken, resume=True))

    want = read_metrics(straight.output_dir)
    got = read_metrics(broken.output_dir)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for w, g in zip(want, got, strict=True):
        for key in ("loss", "accuracy", "lr"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)
    a = load_file(straight.output_dir / "model" / "model.safetensors")
    b = load_file(broken.output_dir / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_data_or_another_model(tiny_lm_dir, preferences_file, tmp_path):
    # A resumed run goes on from its saved step with the same row order and segmentation; another
    # sample of the rows, held-out share, granularity or threshold is a one-line error before any
    # loading (another granularity crashed mid-run; another sample trained on silently).
    cfg = rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=1)
    train_reward_model(cfg)
    recorded = (cfg.output_dir / "run_config.json").read_text()
    for change, message in (
        (dict(granularity="token"), "--granularity token, but the run was started with segment"),
        (dict(max_samples=40), "--max-samples 40, but the run was started with None"),
        (dict(eval_fraction=0.1), "--eval-fraction 0.1, but the run was started with 0.2"),
        (dict(entropy_threshold="2.0"), "--entropy-threshold 2.0, but the run was started with auto"),
        # the format its pairs are rendered in, which segppo.json records for PPO and eval
        (
            dict(chat_template_kwargs={"enable_thinking": False}),
            "--chat-template-kwargs {'enable_thinking': False}, but the run was started with None",
        ),
        (
            dict(chat_template="{{ messages[0]['content'] }}"),
            "--chat-template {{ messages[0]['content'] }}, but",
        ),
    ):
        with pytest.raises(ValueError, match=f"^--resume with {re.escape(message)}"):
            train_reward_model(dataclasses.replace(cfg, resume=True, max_steps=2, **change))
    assert (cfg.output_dir / "run_config.json").read_text() == recorded
    # The data may be a repaired copy: a run stopped by a bad row goes on from it.
    copy = tmp_path / "repaired.jsonl"
    copy.write_text(Path(preferences_file).read_text())
    train_reward_model(dataclasses.replace(cfg, resume=True, max_steps=2, dataset=str(copy)))


def test_resume_takes_the_same_model_given_another_way(tiny_lm_dir, preferences_file, tmp_path, monkeypatch):
    # --model compares as the model it names (`same_model`), not as a string: the same folder by a
    # relative path or with a trailing slash, or a copy of it (a run moved to another machine),
    # resumes; a copy was refused as another model. Another model of the same shape, which the
    # state would load into silently, is still refused.
    import shutil

    from tiny import save_tiny_lm

    cfg = rm_config(tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=1, max_samples=40)
    train_reward_model(cfg)
    copy = shutil.copytree(tiny_lm_dir, tmp_path / "copy")
    monkeypatch.chdir(Path(tiny_lm_dir).parent)
    for steps, model in enumerate((Path(tiny_lm_dir).name, tiny_lm_dir + "/", str(copy)), start=2):
        train_reward_model(dataclasses.replace(cfg, resume=True, max_steps=steps, model=model))
    assert [r["step"] for r in read_metrics(cfg.output_dir, split="train")] == [1, 2, 3, 4]
    other = save_tiny_lm(tmp_path / "other", seed=1)
    message = f"--model {other}, but the run was started with {copy}"
    with pytest.raises(ValueError, match=f"^--resume with {re.escape(message)}$"):
        train_reward_model(dataclasses.replace(cfg, resume=True, max_steps=5, model=other))


@pytest.mark.parametrize(("started", "resumed"), [(None, "{}"), ("{}", None)])
def test_a_resume_takes_empty_template_variables_as_none(
    tiny_lm_dir, preferences_file, tmp_path, started, resumed
):
    # --chat-template-kwargs '{}' renders as no variables at all; a run started without the option
    # and resumed with '{}' (or the reverse) was refused: "--chat-template-kwargs {}, but the run was
    # started with None".
    run = tmp_path / "run"
    cfg = rm_config(
        tiny_lm_dir, preferences_file, run, max_steps=1, max_samples=40, chat_template_kwargs=started
    )
    train_reward_model(cfg)
    train_reward_model(dataclasses.replace(cfg, resume=True, max_steps=2, chat_template_kwargs=resumed))
    assert [r["step"] for r in read_metrics(cfg.output_dir, split="train")] == [1, 2]


@pytest.mark.parametrize("bf16", [False, True])
def test_a_one_rank_zero2_state_of_an_older_segppo_resumes(
    tiny_lm_dir, preferences_file, tmp_path, monkeypatch, bf16
):
    """segppo once trained one rank under the ZeRO stage asked for (now stage 0, `one_rank_zero_stage`):
    a state saved so holds ZeRO's partitioned optimizer files, which a stage-0 engine cannot read.
    A resume of such a run must rebuild the engine the state was saved by and go on as an unbroken run.
    In bf16 DeepSpeed names those files bf16_zero_pp_rank_*."""
    import segppo.optim

    base = dict(max_steps=4, save_every=2, zero_stage=2, bf16=bf16)
    straight = rm_config(tiny_lm_dir, preferences_file, tmp_path / "straight", **base)
    train_reward_model(straight)

    old = rm_config(tiny_lm_dir, preferences_file, tmp_path / "old", **base)

    with monkeypatch.context() as m:  # the older segppo: ZeRO-2 on one rank
        m.setattr(segppo.optim, "one_rank_zero_stage", lambda stage, **_: stage)
        stop_at_step(train_reward_model, old, 3)
    assert list((old.output_dir / "state").glob("*/reward_model/state/*zero_pp_rank_0_*optim_states.pt"))
    with pytest.raises(ValueError, match=r"ZeRO.*--zero-stage 2"):
        train_reward_model(dataclasses.replace(old, resume=True, zero_stage=0))
    train_reward_model(dataclasses.replace(old, resume=True))

    want, got = read_metrics(straight.output_dir), read_metrics(old.output_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for w, g in zip(want, got, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-7), w["step"]
    a = load_file(straight.output_dir / "model" / "model.safetensors")
    b = load_file(old.output_dir / "model" / "model.safetensors")
    # ZeRO-2 and stage 0 round differently; a bf16 model's saved weights may then differ by one
    # bf16 step (2^-8 to 2^-7 relative) where a float32 master weight sits near a rounding boundary.
    rtol = 2**-7 if bf16 else 1e-5
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=1e-6)


def test_two_ranks_match_one_rank(tiny_lm_dir, preferences_file, tmp_path):
    one = rm_config(tiny_lm_dir, preferences_file, tmp_path / "one", max_steps=3, zero_stage=2)
    two = dataclasses.replace(one, output=str(tmp_path / "two"), nproc=2)
    train_reward_model(one)
    train_reward_model(two)
    a = load_file(one.output_dir / "model" / "model.safetensors")
    b = load_file(two.output_dir / "model" / "model.safetensors")
    moved = sum((a[k] - load_file(f"{tiny_lm_dir}/model.safetensors").get(k, a[k])).abs().sum() for k in a)
    assert moved > 0  # training changed the backbone
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    losses = lambda cfg: [r["loss"] for r in read_metrics(cfg.output_dir, split="train")]  # noqa: E731
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)


def test_all_malformed_rows_is_a_clear_error(tiny_lm_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(10)) + "\n")
    with pytest.raises(ValueError, match="question"):
        train_reward_model(rm_config(tiny_lm_dir, str(bad), tmp_path / "out"))
    assert not (tmp_path / "out" / "model").exists()


def test_too_few_pairs_for_a_batch(tiny_lm_dir, tmp_path):
    from tiny import write_preferences

    small = write_preferences(tmp_path / "small.jsonl", n=10)
    with pytest.raises(ValueError, match="fewer than one --batch-size"):
        train_reward_model(rm_config(tiny_lm_dir, small, tmp_path / "out"))


def test_resume_without_state_is_an_error(tiny_lm_dir, preferences_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="no training state"):
        train_reward_model(rm_config(tiny_lm_dir, preferences_file, tmp_path / "none", resume=True))


@pytest.mark.parametrize("resume", [False, True])
def test_output_that_is_a_file_is_an_error(tiny_lm_dir, preferences_file, tmp_path, resume):
    # Said before the data and models are loaded, naming the option, not as "[Errno 17] File exists".
    (tmp_path / "out").write_text("notes")
    with pytest.raises(NotADirectoryError, match=r"^--output .*out: a file, not a folder$"):
        train_reward_model(rm_config(tiny_lm_dir, preferences_file, tmp_path / "out", resume=resume))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(batch_size=12, micro_batch_size=8), "multiple of --micro-batch-size"),
        (dict(granularity="sentence"), "--granularity"),
        (dict(entropy_threshold=-1.0), "--entropy-threshold"),
        (dict(max_prompt_len=64, max_len=64), "--max-prompt-len"),
        (dict(micro_batch_size=0), "--micro-batch-size"),
        (dict(max_samples=0), "--max-samples must be a positive integer, got 0"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg = rm_config("m", "d", "o", **overrides)
        cfg.grad_accum(1)


def test_zero3_bf16_gradient_checkpointing(tiny_lm_dir, preferences_file, tmp_path):
    cfg = rm_config(
        tiny_lm_dir,
        preferences_file,
        tmp_path / "z3",
        zero_stage=3,
        bf16=True,
        gradient_checkpointing=True,
        max_steps=2,
    )
    train_reward_model(cfg)
    weights = load_file(cfg.output_dir / "model" / "model.safetensors")
    assert all(w.numel() > 0 for w in weights.values())  # gathered from the ZeRO-3 partitions
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    model = AutoModelForTokenClassification.from_pretrained(cfg.output_dir / "model")
    assert model.config.num_labels == 1


def test_one_normalizer_resolution_for_ppo_and_eval(tmp_path):
    """`--no-normalize`, `--normalizer`, `--reward-mean/std`, then what the RM records, in that order."""
    from segppo.normalizer import DEFAULT_SIGMA_FLOOR, Normalizer
    from segppo.rm.scoring import resolve_normalizer
    from segppo.segments import Segmentation

    segment, bandit_cut = Segmentation("segment", 2.0), Segmentation("bandit", 1000.0)

    recorded = SegppoMetadata(
        kind="reward_model", normalizer={"params": [0.1, 0.2, 0.3, 0.4], "sigma_floor": 0.05}
    )
    bandit = SegppoMetadata(kind="reward_model", score_mean=1.5, score_std=2.0)
    fitted = Normalizer((1.0, 2.0, 3.0, 4.0), sigma_floor=0.2).save(tmp_path / "normalizer.json")

    choice = resolve_normalizer(recorded, segment)
    assert (choice.params, choice.sigma_floor, choice.source) == ((0.1, 0.2, 0.3, 0.4), 0.05, "segppo.json")
    choice = resolve_normalizer(recorded, segment, normalizer=str(fitted), sigma_floor=0.5)
    assert (choice.params, choice.sigma_floor) == ((1.0, 2.0, 3.0, 4.0), 0.5)
    choice = resolve_normalizer(recorded, segment, reward_mean=1.0, reward_std=3.0)
    assert choice.params == (0.0, 0.0, 1.0, 3.0) and choice.sigma_floor == DEFAULT_SIGMA_FLOOR
    assert resolve_normalizer(recorded, segment, normalize=False).params is None
    assert resolve_normalizer(bandit, bandit_cut).params == (0.0, 0.0, 1.5, 2.0)
    assert resolve_normalizer(bandit, segment).params is None  # a dense RM: raw segment rewards
    with pytest.raises(ValueError, match="go together"):
        resolve_normalizer(recorded, segment, reward_mean=1.0)


def test_a_normalizer_file_of_another_segmentation_is_refused(tmp_path):
    """`--normalizer FILE` fitted on other segments (another granularity, or another threshold) than
    the run cuts would scale rewards it was not fitted on; refused as `fit-normalizer --into-rm`
    refuses it. A file that records no segmentation (made by hand) is taken as it is. The run's
    segments are what counts, not the RM's record: `ppo train --entropy-threshold 1.5` on an RM
    trained at 2.0 takes a normalizer fitted at 1.5 (it was refused, held to the RM's 2.0)."""
    from segppo.normalizer import Normalizer
    from segppo.rm.scoring import resolve_normalizer
    from segppo.segments import Segmentation

    rm = SegppoMetadata(kind="reward_model", granularity="segment", threshold=2.0)
    as_trained = Segmentation("segment", 2.0)
    for name, fields in (
        ("token", dict(granularity="token")),
        ("other", dict(granularity="segment", threshold=1.5)),
    ):
        path = Normalizer((0.0, 0.0, 1.0, 2.0), **fields).save(tmp_path / f"{name}.json")
        with pytest.raises(ValueError, match=rf"^--normalizer .*{name}.json is fitted for "):
            resolve_normalizer(rm, as_trained, normalizer=str(path))
    same = Normalizer((0.0, 0.0, 1.0, 2.0), granularity="segment", threshold=2.0).save(tmp_path / "same.json")
    assert resolve_normalizer(rm, as_trained, normalizer=str(same)).params == (0.0, 0.0, 1.0, 2.0)
    bare = Normalizer((0.0, 0.0, 1.0, 2.0)).save(tmp_path / "bare.json")
    assert resolve_normalizer(rm, as_trained, normalizer=str(bare)).params == (0.0, 0.0, 1.0, 2.0)
    overridden = Segmentation("segment", 1.5)
    other = tmp_path / "other.json"
    assert resolve_normalizer(rm, overridden, normalizer=str(other)).params == (0.0, 0.0, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"fitted for segment rewards \(threshold 2.0\), but the run"):
        resolve_normalizer(rm, overridden, normalizer=str(same))


def test_strict_stops_at_the_first_malformed_row(tiny_lm_dir, tmp_path):
    from tiny import write_preferences

    data = tmp_path / "prefs.jsonl"
    write_preferences(data, n=40)
    data.write_bytes(data.read_bytes() + b'{"prompt": "Q?", "chosen": "\xff", "rejected": "no"}\n')
    with pytest.raises(ValueError, match=r"--strict: row \d+ is malformed: line 41: not UTF-8"):
        train_reward_model(
            rm_config(tiny_lm_dir, str(data), tmp_path / "out", strict=True, eval_fraction=0.1)
        )
    train_reward_model(
        rm_config(tiny_lm_dir, str(data), tmp_path / "lenient", max_steps=1, eval_fraction=0.1)
    )
