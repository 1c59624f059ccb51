"""`segppo fit-normalizer`: measure a reward model's location drift and fit its normalizer.

Reads top to bottom: check the inputs (cheaply, before any model is loaded) → on each rank, load
the reward model with its segmenter, take a seeded sample of preference pairs, format them exactly
as RM training does, score chosen and rejected responses batch by batch and collect `(p = k/K, r_k)`
for every segment → gather the points on rank 0 → fit (`segppo.normalizer.fit_normalizer`), save
`normalizer.json`, optionally a PNG and the RM folder's `segppo.json`.

`segppo.normalizer` holds the pure pieces (collect, bin, fit, apply, import, render) and imports no
models, data or DeepSpeed, so PPO can load a normalizer cheaply; this module is the orchestration
on top of them, as `segppo.rm.trainer` is on top of `segppo.rm.loss`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from segppo.config import FitNormalizerConfig
from segppo.data import (
    EncodedPair,
    collate_preferences,
    load_splits,
    pair_tokens,
)
from segppo.data.sources import numbered, select_split
from segppo.distributed import DistInfo, launch, rank_group
from segppo.io import as_recorded, atomic_write_text
from segppo.models import METADATA_FILE, SegppoMetadata
from segppo.models.reward_model import run_model_folder
from segppo.normalizer import (
    Normalizer,
    PointCollector,
    StdFloorWarning,
    fit_normalizer,
    import_param_json,
    save_plot,
)
from segppo.preflight import check_fit_normalizer
from segppo.rm.scoring import RewardScorer, load_scorer
from segppo.tracking import LiveProgress, console


def run_fit_normalizer(cfg: FitNormalizerConfig) -> Normalizer:
    """Import (`--from-param-json`) or fit (`--reward-model`, `--dataset`); returns the normalizer."""
    if cfg.imports:
        return normalizer_from_param_json(cfg)
    return fit_normalizer_from_rm(cfg)


def normalizer_from_param_json(cfg: FitNormalizerConfig) -> Normalizer:
    """The paper's published fit under `cfg.key`, saved as `cfg.output` (and into the RM with `into_rm`)."""
    normalizer = import_param_json(cfg.from_param_json, cfg.key, sigma_floor=cfg.sigma_floor)
    if cfg.into_rm:
        _into_rm_metadata(cfg.reward_model, normalizer)  # fail before writing anything
    normalizer.save(cfg.output)
    if cfg.into_rm:
        write_into_reward_model(cfg.reward_model, normalizer)
    return normalizer


def fit_normalizer_from_rm(cfg: FitNormalizerConfig) -> Normalizer:
    """Score `cfg.samples` pairs on `cfg.nproc` ranks, fit on rank 0, save; returns the saved normalizer.

    A fitted std line that drops below `sigma_floor` is recorded in the normalizer and emitted
    here as a `StdFloorWarning`.
    """
    check_fit_normalizer(cfg)  # paths and hub names, in one line, before any start-up
    check_fit_inputs(cfg)
    launch(_fit_worker, cfg, nproc=cfg.nproc)
    normalizer = Normalizer.load(cfg.output)
    if normalizer.floor_warning:
        warnings.warn(normalizer.floor_warning, StdFloorWarning, stacklevel=2)
    return normalizer


# --------------------------------------------------------------------------------------------
# Inputs


def check_fit_inputs(cfg: FitNormalizerConfig) -> None:
    """The errors worth catching before models are loaded or ranks spawned (a spawned rank's
    error reaches the user as a traceback): a missing RM folder, an RM that records no
    granularity, `--into-rm` on a folder without `segppo.json`, `--plot` without matplotlib,
    an empty dataset."""
    _check_reward_model(cfg)
    if cfg.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(
                "--plot needs matplotlib, which is not importable here: pip install matplotlib"
            ) from None
    load_preference_rows(cfg)


def _check_reward_model(cfg: FitNormalizerConfig) -> None:
    path = Path(cfg.reward_model).expanduser()
    if not path.is_dir():
        if path.exists() or _looks_local(cfg.reward_model):
            raise FileNotFoundError(f"reward model {cfg.reward_model}: no such folder")
        if cfg.into_rm:
            raise ValueError(f"--into-rm needs a local reward model folder, not hub name {cfg.reward_model}")
        return  # a hub name: load_scorer fetches it and checks it
    folder = run_model_folder(path)
    file = folder / METADATA_FILE
    if file.is_file():
        metadata = SegppoMetadata.load(file)
        if cfg.into_rm:
            _check_same_segmentation(cfg, metadata, file)
        return
    if cfg.into_rm:
        _metadata_file_for_into_rm(cfg.reward_model)  # raises: an imported folder has no segppo.json
    if cfg.granularity is None and not _is_sequence_classifier(folder):
        raise ValueError(
            f"{folder} has no segppo.json, so it does not record the reward model's granularity: "
            "pass --granularity segment (with --threshold and --segmenter), token or bandit"
        )


def _check_same_segmentation(cfg: FitNormalizerConfig, metadata: SegppoMetadata, file: Path) -> None:
    """`--into-rm` stores a fit in the RM folder, so it must be a fit of the RM as it records itself."""
    for name, override in (("granularity", cfg.granularity), ("threshold", cfg.threshold)):
        recorded = getattr(metadata, name)
        if override is not None and override != recorded:
            raise ValueError(
                f"--into-rm with --{name} {override}: {file} records {name} {recorded}, and the "
                "normalizer stored there must be fitted with the reward model's own segmentation"
            )


def _is_sequence_classifier(folder: Path) -> bool:
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _looks_local(text: str) -> bool:
    """A string that can only be a path (a hub name is `owner/name`)."""
    return Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1


def load_preference_rows(cfg: FitNormalizerConfig):
    """`cfg.split` of `cfg.dataset`; an empty dataset is a ValueError."""
    path = Path(cfg.dataset).expanduser()
    if path.is_file() and not path.read_bytes().strip():
        raise ValueError(f"{cfg.dataset} is empty: no preference pairs to score")
    try:
        splits = load_splits(cfg.dataset)
    except StopIteration:  # what `datasets` raises for a file without rows
        raise ValueError(f"{cfg.dataset} holds no rows: no preference pairs to score") from None
    rows = select_split(splits, cfg.split, cfg.dataset)
    if len(rows) == 0:
        raise ValueError(f"{cfg.dataset}: split {cfg.split!r} has no rows: no preference pairs to score")
    return rows


def sample_rows(rows, samples: int, seed: int):
    """`samples` rows drawn without replacement by a seeded shuffle (all rows if there are fewer)."""
    count = min(samples, len(rows))
    chosen = np.sort(np.random.default_rng(seed).permutation(len(rows))[:count])
    return numbered(rows).select(chosen)


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share `[start, stop)` of `total` items."""
    return total * rank // world_size, total * (rank + 1) // world_size


# --------------------------------------------------------------------------------------------
# Collect


def _pair_length(pair: EncodedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def collect_points(
    scorer: RewardScorer,
    pairs: Sequence[EncodedPair],
    *,
    batch_size: int,
    progress: LiveProgress | None = None,
) -> PointCollector:
    """`(p, r)` of every segment of both responses of `pairs`, scored `batch_size` pairs at a time.

    Batches are formed from pairs of similar length (less padding); each is formatted, scored and
    segmented exactly as in RM training (`collate_preferences`, `scorer.score`, `segment_points`).
    """
    seg = scorer.segmentation
    collector = PointCollector(granularity=seg.granularity, threshold=seg.threshold)
    order = sorted(range(len(pairs)), key=lambda i: _pair_length(pairs[i]))
    pad = scorer.tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = [pairs[i] for i in order[start : start + batch_size]]
        batch = collate_preferences(chunk, pad).to(scorer.device)
        scored = scorer.score(batch)
        collector.add_batch(scored.rm_values, scored.entropy, batch.response_mask, batch.has_eos)
        if progress is not None:
            progress.update(1, tokens=sum(pair_tokens(pair) for pair in chunk), segments=len(collector))
    return collector


def _fit_worker(cfg: FitNormalizerConfig) -> None:
    """One rank (module-level, so that spawned ranks can unpickle it)."""
    with rank_group() as info:
        _fit_on_rank(cfg, info)


def _fit_on_rank(cfg: FitNormalizerConfig, info: DistInfo) -> None:
    scorer = load_scorer(
        cfg.reward_model,
        device=info.device,
        dtype="bf16" if cfg.bf16 else None,
        segmenter=cfg.segmenter,
        granularity=cfg.granularity,
        threshold=cfg.threshold,
        trust_remote_code=cfg.trust_remote_code,
    )
    all_rows = load_preference_rows(cfg)
    rows = sample_rows(all_rows, cfg.samples, cfg.seed)
    if info.is_main:
        console.print(
            f"[bold]fit-normalizer[/] {len(rows):,} of {len(all_rows):,} rows of {escape(cfg.dataset)} "
            f"(split {escape(cfg.split)}, seed {cfg.seed}) on {info.world_size} rank(s)"
        )
    start, stop = shard_bounds(len(rows), info.rank, info.world_size)
    pairs, report = [], None
    if stop > start:
        pairs, report = scorer.encode_pairs(rows.select(range(start, stop)), cfg)
    num_batches = -(-len(pairs) // cfg.batch_size)
    with LiveProgress(num_batches, "scoring segments", enabled=info.is_main, unit="batches") as progress:
        collector = collect_points(scorer, pairs, batch_size=cfg.batch_size, progress=progress)
    p, r = collector.arrays()
    local = {
        "p": p,
        "r": r,
        "rows": stop - start,
        "pairs": len(pairs),
        "skipped": report.skipped if report else 0,
        "reasons": report.reasons if report else [],
        "truncated_prompts": report.truncated_prompts if report else 0,
        "truncated_responses": report.truncated_responses if report else 0,
    }
    parts = [local]
    if info.world_size > 1:
        parts = [None] * info.world_size
        torch.distributed.all_gather_object(parts, local)
    if info.is_main:
        _fit_and_save(cfg, scorer, parts)
    if info.world_size > 1:  # under an outer launcher every rank then reads the file rank 0 wrote
        torch.distributed.barrier()


def _fit_and_save(cfg: FitNormalizerConfig, scorer: RewardScorer, parts: list[dict[str, Any]]) -> None:
    total = {k: sum(part[k] for part in parts) for k in ("rows", "pairs", "skipped")}
    if total["pairs"] == 0:
        reasons = [reason for part in parts for reason in part["reasons"]][:3]
        raise ValueError(
            f"{cfg.dataset}: no usable preference pairs among {total['rows']} sampled rows"
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    p = np.concatenate([part["p"] for part in parts])
    r = np.concatenate([part["r"] for part in parts])
    seg = scorer.segmentation
    with warnings.catch_warnings():  # recorded in the normalizer; the caller re-emits it once
        warnings.simplefilter("ignore", StdFloorWarning)
        normalizer = fit_normalizer(
            p,
            r,
            fit_mode=cfg.fit_mode,
            min_bin_count=cfg.min_bin_count,
            min_r2=cfg.min_r2,
            sigma_floor=cfg.sigma_floor,
            granularity=seg.granularity,
            threshold=seg.threshold if seg.granularity == "segment" else None,
            reward_model=as_recorded(cfg.reward_model),
            dataset=as_recorded(cfg.dataset),
        )
    truncated = [sum(part[k] for part in parts) for k in ("truncated_prompts", "truncated_responses")]
    normalizer.extra["data"] = {
        "dataset": as_recorded(cfg.dataset),
        "split": cfg.split,
        "seed": cfg.seed,
        "samples": cfg.samples,
        "rows": total["rows"],
        "pairs": total["pairs"],
        "responses": 2 * total["pairs"],
        "skipped_rows": total["skipped"],
        "truncated_prompts": truncated[0],
        "truncated_responses": truncated[1],
        "max_len": cfg.max_len,
        "max_prompt_len": cfg.max_prompt_len,
        "segmenter": scorer.segmenter_name,
    }
    reasons = [reason for part in parts for reason in part["reasons"]][:5]  # the ranks' shares in order
    console.print(
        f"scored {total['pairs']:,} pairs ({2 * total['pairs']:,} responses, {len(p):,} segment scores); "
        f"{total['skipped']} rows skipped"
        + (f"; first reasons: {escape('; '.join(reasons))}" if reasons else "")
        + (f"; {truncated[0]} prompts and {truncated[1]} responses truncated" if any(truncated) else "")
    )
    path = normalizer.save(cfg.output)
    console.print(f"[bold green]saved[/] {escape(str(path))}")
    if cfg.plot:
        console.print(f"[bold green]saved[/] {escape(str(save_plot(normalizer, cfg.plot)))}")
    if cfg.into_rm:
        console.print(
            f"[bold green]saved[/] {escape(str(write_into_reward_model(cfg.reward_model, normalizer)))}"
        )


# --------------------------------------------------------------------------------------------
# Into the reward model's segppo.json


def _metadata_file_for_into_rm(reward_model: str) -> Path:
    path = Path(reward_model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--into-rm: reward model folder {reward_model} does not exist")
    file = run_model_folder(path) / METADATA_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"--into-rm: {file.parent} has no {METADATA_FILE} (an imported reward model); "
            "give the normalizer.json to PPO with --normalizer instead"
        )
    return file


def write_into_reward_model(reward_model: str, normalizer: Normalizer) -> Path:
    """Set the `normalizer` field of the RM folder's `segppo.json`, atomically, keeping every other field.

    A normalizer that records a different granularity (or segment threshold) than the RM is refused:
    PPO would apply it to segments it was not fitted on.
    """
    file, metadata = _into_rm_metadata(reward_model, normalizer)
    metadata = dataclasses.replace(metadata, normalizer=normalizer.to_dict())
    atomic_write_text(file, metadata.to_json())
    return file


def _into_rm_metadata(reward_model: str, normalizer: Normalizer) -> tuple[Path, SegppoMetadata]:
    """The RM folder's `segppo.json` and what it holds, once `normalizer` is found to fit that RM."""
    file = _metadata_file_for_into_rm(reward_model)
    metadata = SegppoMetadata.load(file)
    if not normalizer.fits(metadata.granularity, metadata.threshold):
        raise ValueError(
            f"--into-rm: the normalizer is for {normalizer.granularity} "
            f"(threshold {normalizer.threshold}) but {file} records {metadata.granularity} "
            f"(threshold {metadata.threshold})"
        )
    return file, metadata


__all__ = [
    "check_fit_inputs",
    "collect_points",
    "fit_normalizer_from_rm",
    "load_preference_rows",
    "normalizer_from_param_json",
    "run_fit_normalizer",
    "sample_rows",
    "shard_bounds",
    "write_into_reward_model",
]
