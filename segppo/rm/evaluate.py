"""`segppo rm eval` and `segppo rm inspect`: accuracy on held-out pairs, and one response's segments."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from segppo.config import RMEvalConfig
from segppo.data import (
    PromptExample,
    collate_responses,
    load_splits,
    segment_texts,
    select_split,
    split_train_eval,
)
from segppo.distributed import DistInfo
from segppo.io import same_source
from segppo.kernels import segment_rewards
from segppo.rm.scoring import RewardScorer, load_scorer
from segppo.rm.trainer import evaluate_pairs


def evaluate_reward_model(cfg: RMEvalConfig) -> dict:
    """Pairwise accuracy and score statistics of a reward model on a preference dataset.

    When the dataset and split are the ones the RM was trained on, only the rows held out from
    training are used (rebuilt from the seed and fraction recorded in `segppo.json`), never the
    training rows.
    """
    scorer = load_scorer(
        cfg.model,
        segmenter=cfg.segmenter,
        granularity=cfg.granularity,
        threshold=cfg.threshold,
        trust_remote_code=cfg.trust_remote_code,
    )
    splits = load_splits(cfg.dataset)
    trained_on = scorer.metadata.data or {}
    rows_note = f"split {cfg.split!r}"
    if same_source(trained_on.get("dataset"), cfg.dataset) and trained_on.get("split") == cfg.split:
        _, rows = split_train_eval(
            splits,
            eval_split=trained_on.get("eval_split"),
            eval_fraction=trained_on.get("eval_fraction", 0.02),
            seed=trained_on.get("seed", 0),
            train_split=cfg.split,
        )
        rows_note = "the rows held out from this reward model's training"
    else:
        rows = select_split(splits, cfg.split, cfg.dataset)
    if cfg.max_samples is not None:
        rows = rows.select(range(min(cfg.max_samples, len(rows))))
    try:
        pairs, report = scorer.encode_pairs(rows, cfg)
    except ValueError as err:  # no usable layout, a --strict row: say which data
        raise ValueError(f"{cfg.dataset}: {err}") from err
    if not pairs:
        raise ValueError(f"{cfg.dataset}: no usable preference pairs ({report})")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=scorer.device)
    stats = evaluate_pairs(
        scorer.model,
        scorer.segmenter,
        pairs,
        scorer.segmentation,
        micro_batch_size=cfg.batch_size,
        pad_token_id=scorer.tokenizer.pad_token_id,
        info=info,
    )
    stats.update(
        dataset=cfg.dataset,
        rows=rows_note,
        skipped_rows=report.skipped,
        truncated_prompts=report.truncated_prompts,
        truncated_responses=report.truncated_responses,
        granularity=scorer.segmentation.granularity,
        threshold=scorer.segmentation.threshold if scorer.segmentation.needs_entropy else None,
    )
    return stats


@dataclass
class SegmentView:
    index: int  # k, 1-based; 0 for tokens outside every segment (a trailing EOS)
    text: str
    start: int  # first response position
    end: int  # last response position (the segment end)
    reward: float  # the RM's value at the end
    normalized: float | None  # with the RM's normalizer, when it has one
    entropy_at_end: float


def inspect_response(scorer: RewardScorer, prompt: str | list[dict], response: str) -> list[SegmentView]:
    """Split one response into the RM's segments and read each segment's reward."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    prompt_ids = scorer.chat.encode_prompt(PromptExample(prompt=messages)).prompt_ids
    response_ids, has_eos = scorer.chat.response_ids(messages, response, prompt_ids=prompt_ids)
    batch = collate_responses([prompt_ids], [response_ids], [has_eos], scorer.tokenizer.pad_token_id)
    scored = scorer.score(batch)
    mask = batch.response_mask.to(scorer.device)
    has_eos_t = batch.has_eos.to(scorer.device)
    kwargs = dict(
        granularity=scorer.segmentation.granularity,
        threshold=scorer.segmentation.threshold,
        has_eos=has_eos_t,
    )
    raw = segment_rewards(scored.rm_values, scored.entropy, mask, distribute="end", **kwargs)
    normalized = None
    normalizer = (scorer.metadata.normalizer or {}).get("params")
    if normalizer is not None:
        sigma_floor = scorer.metadata.normalizer.get("sigma_floor", 1e-2)
        normalized = segment_rewards(
            scored.rm_values,
            scored.entropy,
            mask,
            distribute="end",
            normalizer=normalizer,
            sigma_floor=sigma_floor,
            **kwargs,
        ).rewards[0]
    ends = torch.nonzero(raw.ends[0]).flatten().tolist()
    # Decoded in context, so that the segments' texts concatenate to the response's text.
    pieces = [e + 1 for e in ends]
    if not ends or ends[-1] + 1 < len(response_ids):  # a trailing EOS outside every dense segment
        pieces.append(len(response_ids))
    texts = segment_texts(scorer.tokenizer, response_ids, pieces)
    views, start = [], 0
    for k, end in enumerate(ends, start=1):
        views.append(
            SegmentView(
                index=k,
                text=texts[k - 1],
                start=start,
                end=end,
                reward=raw.rewards[0, end].item(),
                normalized=None if normalized is None else normalized[end].item(),
                entropy_at_end=scored.entropy[0, end].item(),
            )
        )
        start = end + 1
    if start < len(response_ids):  # a trailing EOS outside every dense segment
        text = texts[-1]
        views.append(SegmentView(0, text, start, len(response_ids) - 1, 0.0, None, float("nan")))
    return views
