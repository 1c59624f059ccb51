"""Preference data from a real policy's own samples, labelled by the sentiment gold judge.

    data = make_real_data("runs/real", smollm2_folder(), pairs=64, eval_pairs=16, ...)

Writes, in the layouts segppo reads (as `segppo.demo.data` does for the synthetic task):

    data/prompts_train.jsonl      {"prompt": ...}   PPO prompts (train subjects)
    data/prompts_heldout.jsonl    {"prompt": ...}   evaluation prompts (held-out subjects)
    data/preferences/train.jsonl  {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}
    data/preferences/test.jsonl   the same on held-out prompts

Two responses are sampled per prompt through PPO's path (the policy's chat template, segppo's
`generate`) and each pair is labelled with Bradley-Terry noise on the gold reward
(`segppo.demo.data.label_pairs`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from segppo.models import load_policy, load_tokenizer

from .data import label_agreement, label_pairs, sample_responses, write_jsonl
from .sentiment import sample_prompts, sentiment


@dataclass
class RealData:
    policy: Path
    prompts_train: Path
    prompts_heldout: Path
    preferences: Path  # a folder with train.jsonl and test.jsonl
    report: dict = field(default_factory=dict)


def make_real_data(
    output: str | os.PathLike,
    policy: str | os.PathLike,
    *,
    pairs: int,
    eval_pairs: int,
    ppo_prompts: int,
    heldout_prompts: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    label_temperature: float = 0.1,
    batch_size: int = 16,
    seed: int = 0,
    log=None,
) -> RealData:
    """Prompt files and preference pairs sampled from `policy` (a Hugging Face folder)."""
    log = log or (lambda message: None)
    data_dir = Path(output) / "data"
    start = time.perf_counter()
    prompts_train = write_jsonl(
        data_dir / "prompts_train.jsonl", [{"prompt": p} for p in sample_prompts(ppo_prompts, "train", seed)]
    )
    prompts_heldout = write_jsonl(
        data_dir / "prompts_heldout.jsonl",
        [{"prompt": p} for p in sample_prompts(heldout_prompts, "heldout", seed)],
    )
    tokenizer = load_tokenizer(policy)
    model = load_policy(policy, dtype="fp32").eval()
    splits = {}
    for split, file, n, offset in (("train", "train", pairs, 1), ("heldout", "test", eval_pairs, 2)):
        prompts = sample_prompts(n, split, seed + offset)
        samples = sample_responses(
            model,
            tokenizer,
            [p for p in prompts for _ in range(2)],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + offset,
            batch_size=batch_size,
        )
        rows = label_pairs(
            prompts,
            samples.responses[0::2],
            samples.responses[1::2],
            temperature=label_temperature,
            seed=seed + offset,
            gold=lambda prompt, response: sentiment(response),
        )
        write_jsonl(data_dir / "preferences" / f"{file}.jsonl", rows)
        splits[file] = {
            "pairs": len(rows),
            "label_agreement_with_gold": label_agreement(rows) if rows else float("nan"),
            "eos_rate": sum(samples.has_eos) / len(samples.has_eos),
            "mean_tokens": sum(samples.num_tokens) / len(samples.num_tokens),
        }
    seconds = time.perf_counter() - start
    log(f"{splits['train']['pairs']} + {splits['test']['pairs']} preference pairs in {seconds:.0f}s")
    report = {"policy": str(policy), "seed": seed, "preferences": splits, "seconds": round(seconds, 1)}
    return RealData(Path(policy), prompts_train, prompts_heldout, data_dir / "preferences", report)
