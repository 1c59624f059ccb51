"""A reward model's local credit on the demo's task: does its dense reward land on the right phrases?

The gold reward is a sum of per-phrase contributions (`phrase_rewards`), so a dense reward can be
checked phrase by phrase: sum the per-token rewards PPO would receive (normalized, spread over the
tokens as PPO spreads them, no KL) over each phrase's tokens, and correlate those sums with the
phrases' gold contributions, pooled over responses. A bandit RM puts its whole score on the last
token, so its local credit is that of a reward that knows nothing of where things happened.

On the `pairs` task the same sums also say whether the RM tells a right pair from a swapped one
(`pair_auc`): every word of a swapped item is in the prompt, so only a model that matches each
color to its animal across the prompt can rank the right items above the swapped ones.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from segppo.data import PromptExample, collate_responses
from segppo.kernels import segment_rewards
from segppo.rm.scoring import load_scorer, resolve_normalizer

from .task import Phrase, phrase_rewards, split_phrases, words


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are fewer than 2 points."""
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def phrase_reward_sums(
    rm_dir: str | Path,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    distribute: str = "interpolate",
    batch_size: int = 128,
) -> list[tuple[float, Phrase]]:
    """(dense reward summed over the phrase, the phrase with its gold contribution) for every phrase
    of every response.

    The demo's tokenizer is word-level, so response token i is word i; a trailing EOS belongs to
    the last phrase (a bandit RM's score sits there)."""
    scorer = load_scorer(str(rm_dir), device="cpu")
    seg = scorer.segmentation
    choice = resolve_normalizer(scorer.metadata, seg)
    points: list[tuple[float, Phrase]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(
            zip(prompts[start : start + batch_size], responses[start : start + batch_size], strict=True)
        )
        prompt_ids, response_ids, eos = [], [], []
        for prompt, response in chunk:
            messages = [{"role": "user", "content": prompt}]
            ids = scorer.chat.encode_prompt(PromptExample(prompt=messages)).prompt_ids
            rids, has_eos = scorer.chat.response_ids(messages, response, prompt_ids=ids)
            if len(rids) != len(words(response)) + int(has_eos):
                raise ValueError(f"the demo tokenizer is word-level, but {response!r} has {len(rids)} tokens")
            prompt_ids.append(ids)
            response_ids.append(rids)
            eos.append(has_eos)
        batch = collate_responses(prompt_ids, response_ids, eos, scorer.tokenizer.pad_token_id)
        scored = scorer.score(batch)
        with torch.no_grad():
            dense = segment_rewards(
                scored.rm_values,
                scored.entropy,
                batch.response_mask.to(scorer.device),
                granularity=seg.granularity,
                threshold=seg.threshold,
                has_eos=batch.has_eos.to(scorer.device),
                normalizer=choice.params,
                sigma_floor=choice.sigma_floor,
                distribute=distribute,
            ).rewards
        for row, (prompt, response) in enumerate(chunk):
            values = dense[row, : len(response_ids[row])].tolist()
            phrases = phrase_rewards(prompt, response)
            lengths = [len(w) for w in split_phrases(response)]
            lengths[-1] += len(values) - sum(lengths)  # the EOS token
            at = 0
            for phrase, n in zip(phrases, lengths, strict=True):
                points.append((sum(values[at : at + n]), phrase))
                at += n
    return points


def auc(higher: Sequence[float], lower: Sequence[float]) -> float:
    """P(a value of `higher` > a value of `lower`), ties counting half; nan when either is empty."""
    if not higher or not lower:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(higher) + [0] * len(lower)
    return float(roc_auc_score(labels, [*higher, *lower]))


def local_credit(rm_dir: str | Path, prompts: Sequence[str], responses: Sequence[str], **kwargs) -> dict:
    """Correlation of per-phrase dense reward sums with per-phrase gold contributions, and on the
    `pairs` task the AUC of right items' sums against swapped items' (nan on other tasks)."""
    points = phrase_reward_sums(rm_dir, prompts, responses, **kwargs)
    return {
        "correlation": pearson([s for s, _ in points], [p.reward for _, p in points]),
        "pair_auc": auc(
            [s for s, p in points if p.kind == "pair" and p.reason == "correct"],
            [s for s, p in points if p.reason == "swapped pair"],
        ),
        "phrases": len(points),
        "responses": len(prompts),
    }
