"""The RM learning curve of the demo (`segppo.demo.learning_curve`, benchmarks/rm_learning_curve.py)."""

from __future__ import annotations

import json
import math

import pytest

from segppo.demo import DemoBudget, SFTSettings
from segppo.demo.credit import auc
from segppo.demo.learning_curve import (
    CurveSettings,
    curve_markdown,
    first_clearing,
    label_ceilings,
    run_learning_curve,
    save_curve_plot,
)

PAIRS = "list : Red Fox ; Blue Owl"


def test_auc_counts_ties_half():
    assert auc([2.0, 3.0], [1.0]) == 1.0
    assert auc([1.0], [2.0, 3.0]) == 0.0
    assert auc([1.0, 2.0], [1.0, 0.0]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert math.isnan(auc([], [1.0]))


def test_label_ceilings_separate_matching_from_everything_else(tmp_path):
    right, swapped = "the red fox . the blue owl .", "the blue fox . the red owl ."
    rows = [
        # only the pairing differs: the matching-blind scorer ties (0.5), the gold reward is right
        {"prompt": PAIRS, "chosen": right, "rejected": swapped},
        # an unfinished item: both tell it
        {"prompt": PAIRS, "chosen": right, "rejected": "the red fox . the blue"},
        # a noisy label against the gold reward: both are wrong
        {"prompt": PAIRS, "chosen": "the green fox .", "rejected": right},
    ]
    prefs = tmp_path / "preferences"
    prefs.mkdir()
    for split in ("train", "test"):
        (prefs / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ceilings = label_ceilings(prefs)
    assert ceilings["gold"] == pytest.approx(2 / 3)
    assert ceilings["matching_blind"] == pytest.approx(1.5 / 3)
    # the matching-blind value of an in-prompt item: the mean gold of those items in the training
    # pairs (7 right items, 2 swapped; the unfinished "the blue" and the green fox are not such items)
    assert ceilings["in_prompt_item_value"] == pytest.approx((7 - 2) / 9)


def test_first_clearing_is_the_cheapest_budget_where_every_granularity_clears():
    def row(g, n, epoch, acc):
        return {"granularity": g, "pairs": n, "epoch": epoch, "accuracy": (acc, 0.01)}

    table = [
        row("bandit", 100, 1, 0.72), row("token", 100, 1, 0.69),
        row("bandit", 100, 2, 0.75), row("token", 100, 2, 0.71),   # 200 pair-epochs
        row("bandit", 150, 1, 0.71), row("token", 150, 1, 0.70),   # 150: the cheapest
        row("bandit", 400, 1, 0.90),                               # token missing: not a budget
    ]  # fmt: skip
    assert first_clearing(table, ("bandit", "token")) == {
        "pairs": 150,
        "epoch": 1,
        "accuracy": {"bandit": 0.71, "token": 0.70},
    }
    assert first_clearing(table[:2], ("bandit", "token")) is None


def tiny_budget() -> DemoBudget:
    return DemoBudget(
        name="tiny-curve",
        sft=SFTSettings(hidden_size=16, intermediate_size=32, pretrain_steps=20, sft_steps=10, batch_size=16),
        preference_pairs=64,
        heldout_prompts=256,
        ppo_prompts=8,
        rm_batch_size=16,
        normalizer_pairs=32,
        credit_responses=32,
    )


def test_learning_curve_end_to_end_and_resumable(tmp_path, monkeypatch):
    from segppo.demo import budget as budget_module

    monkeypatch.setitem(budget_module.BUDGETS, "tiny-curve", tiny_budget)
    backbone = SFTSettings(
        hidden_size=24, intermediate_size=48, pretrain_steps=20, sft_steps=10, batch_size=16
    )
    settings = CurveSettings(
        task="pairs",
        budget="tiny-curve",
        multipliers=(0.5,),
        epochs=2,
        granularities=("bandit", "segment"),
        seeds=1,
        eval_pairs=32,
        rm_backbone=backbone,
    )
    out, cache = tmp_path / "curve", tmp_path / "cache"
    summary = run_learning_curve(out, settings, cache_dir=cache, threads=1, log=lambda m: None)
    points = summary["points"]
    assert [(p["granularity"], p["pairs"], p["seed"]) for p in points] == [
        ("bandit", 32, 0),
        ("segment", 32, 0),
    ]
    for p in points:
        assert len(p["accuracy_by_epoch"]) == 2 and p["accuracy_by_epoch"][-1] == p["accuracy"]
        # (a 30-step policy's phrases are mostly malformed, so their gold may be constant: credit nan)
        assert p["eval_pairs"] == 32 and isinstance(p["local_credit"], float)
        # the 0.5× point trained on 32 pairs (the pool holds 0.5 × 64 = 32)
        meta = json.loads(
            (out / "pairs-32" / p["granularity"] / "seed-0" / "rm" / "model" / "segppo.json").read_text()
        )
        assert meta["data"]["train_pairs"] == 32
    # the RMs start from the larger backbone, and the segmenter is still the SFT policy
    meta = json.loads((out / "pairs-32" / "segment" / "seed-0" / "rm" / "model" / "segppo.json").read_text())
    report = json.loads((out / "data" / "task_report.json").read_text())
    assert report["rm_backbone_training"]["settings"]["hidden_size"] == 24
    assert meta["base_model"] != meta["segmenter"] and "sft-" in meta["segmenter"]
    assert json.dumps(json.loads((out / "curve.json").read_text())["points"]) == json.dumps(points)
    assert [(r["pairs"], r["epoch"], r["granularity"]) for r in summary["table"]] == [
        (32, 1, "bandit"), (32, 1, "segment"), (32, 2, "bandit"), (32, 2, "segment")
    ]  # fmt: skip
    assert summary["table"][0]["local_credit"] is None and summary["table"][2]["local_credit"] is not None
    assert summary["ceilings"]["eval_pairs"] == 32 and 0.5 < summary["ceilings"]["gold"] <= 1.0

    # A rerun with a smaller multiplier reuses the data (its pool is large enough) and the finished
    # points, and trains only the new ones.
    trained = out / "pairs-32" / "bandit" / "seed-0" / "rm" / "model" / "model.safetensors"
    before = trained.stat().st_mtime_ns
    data_before = (out / "data" / "preferences" / "train.jsonl").stat().st_mtime_ns
    wider = CurveSettings(**{**settings.__dict__, "multipliers": (0.25, 0.5)})
    summary = run_learning_curve(out, wider, cache_dir=cache, threads=1, log=lambda m: None)
    assert [(p["granularity"], p["pairs"]) for p in summary["points"]] == [
        ("bandit", 32), ("segment", 32), ("bandit", 16), ("segment", 16)
    ]  # fmt: skip
    assert trained.stat().st_mtime_ns == before
    assert (out / "data" / "preferences" / "train.jsonl").stat().st_mtime_ns == data_before
    # More seeds, or fewer granularities, on the same data: only the new points train, and the
    # earlier ones stay in the summary (the table says how many seeds each mean is over).
    more_seeds = CurveSettings(
        **{**wider.__dict__, "multipliers": (0.25,), "seeds": 2, "granularities": ("bandit",)}
    )
    summary = run_learning_curve(out, more_seeds, cache_dir=cache, threads=1, log=lambda m: None)
    assert [(p["granularity"], p["pairs"], p["seed"]) for p in summary["points"]] == [
        ("bandit", 32, 0), ("segment", 32, 0), ("bandit", 16, 0), ("segment", 16, 0), ("bandit", 16, 1)
    ]  # fmt: skip
    assert trained.stat().st_mtime_ns == before
    seeds_per_cell = {(r["pairs"], r["epoch"], r["granularity"]): r["seeds"] for r in summary["table"]}
    assert seeds_per_cell[16, 2, "bandit"] == 2 and seeds_per_cell[16, 2, "segment"] == 1
    # A larger one needs a larger pool: new data, and the points of the old data are dropped.
    larger = CurveSettings(**{**settings.__dict__, "multipliers": (1.0,), "granularities": ("bandit",)})
    summary = run_learning_curve(out, larger, cache_dir=cache, threads=1, log=lambda m: None)
    assert [(p["granularity"], p["pairs"]) for p in summary["points"]] == [("bandit", 64)]
    assert (out / "data" / "preferences" / "train.jsonl").stat().st_mtime_ns != data_before

    assert "| 64 | 2 | bandit | 1 |" in curve_markdown(summary)
    assert save_curve_plot(summary, out / "curve.png").read_bytes()[:4] == b"\x89PNG"
