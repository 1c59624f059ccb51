"""The demo's data: prompt sets, preference pairs sampled from the SFT policy, gold measurements.

Everything the later stages read is an ordinary file in the layouts segppo already reads:

    prompts_train.jsonl      {"prompt": ...}   PPO prompts (train split)
    prompts_heldout.jsonl    {"prompt": ...}   evaluation prompts, never trained on
    preferences/train.jsonl  {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}
    preferences/test.jsonl   the same on held-out prompts: the RM's held-out accuracy

`preferences/` loads as a dataset with a train and a test split (`segppo.data.load_splits`), so
`rm train --dataset DIR/preferences` evaluates on held-out prompts by itself. The gold columns are
not score columns segppo reads as margins; they are there for inspection.

Responses are sampled from the SFT policy through the same path PPO uses (`encode_prompts` with
the policy's chat template, `segppo.generation.generate`), two per prompt, and each pair is
labelled by the gold reward with Bradley-Terry noise: a wins with probability
sigmoid((g_a - g_b) / label_temperature).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from segppo.data import ChatFormat, encode_prompts
from segppo.generation import SamplingConfig, generate
from segppo.io import atomic_write_json, atomic_write_text
from segppo.models import load_policy, load_tokenizer

from .budget import DemoBudget, get_budget
from .sft import TRAINING_FILE, sft_policy
from .task import TASK_VERSION, Demonstrator, gold_reward, sample_prompts, words


@dataclass
class Samples:
    """Generated responses: the text of each, whether it ended with the EOS, its token count."""

    prompts: list[str]
    responses: list[str]
    has_eos: list[bool]
    num_tokens: list[int]


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> Samples:
    """One sampled response per prompt (repeat a prompt for several), as PPO would sample it."""
    chat = ChatFormat(tokenizer)
    encoded, _ = encode_prompts([{"prompt": p} for p in prompts], tokenizer)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=tuple(chat.stop_token_ids)
    )
    torch.manual_seed(seed)
    out = Samples(list(prompts), [], [], [])
    for start in range(0, len(encoded), batch_size):
        batch = generate(model, encoded[start : start + batch_size], sampling, chat.pad_token_id, "cpu")
        lengths = batch.response_mask.sum(-1).tolist()
        rows = [ids[:n] for ids, n in zip(batch.response_ids.tolist(), lengths, strict=True)]
        out.responses += tokenizer.batch_decode(rows, skip_special_tokens=True)
        out.has_eos += batch.has_eos.tolist()
        out.num_tokens += lengths
    return out


@dataclass
class GoldStats:
    """Mean gold reward of responses with its standard error, and how they ended."""

    mean: float
    se: float
    n: int
    eos_rate: float | None = None
    mean_words: float | None = None

    @classmethod
    def of(cls, scores: Sequence[float], has_eos: Sequence[bool] | None = None, num_words=None) -> GoldStats:
        n = len(scores)
        se = statistics.stdev(scores) / math.sqrt(n) if n > 1 else float("nan")
        eos = sum(has_eos) / len(has_eos) if has_eos else None
        length = statistics.fmean(num_words) if num_words else None
        return cls(statistics.fmean(scores), se, n, eos, length)

    def __str__(self) -> str:
        text = f"{self.mean:+.3f} ± {self.se:.3f} (n={self.n})"
        if self.eos_rate is not None:
            text += f", EOS {self.eos_rate:.1%}"
        return text


def policy_gold(
    policy_dir: str | os.PathLike, prompts: Sequence[str], *, seed: int = 0, **sampling
) -> tuple[GoldStats, Samples]:
    """Gold reward of a policy folder's samples (one per prompt)."""
    tokenizer = load_tokenizer(policy_dir)
    model = load_policy(policy_dir, dtype="fp32").eval()
    samples = sample_responses(model, tokenizer, prompts, seed=seed, **sampling)
    scores = [gold_reward(p, r) for p, r in zip(samples.prompts, samples.responses, strict=True)]
    return GoldStats.of(scores, samples.has_eos, [len(words(r)) for r in samples.responses]), samples


def demonstrator_gold(prompts: Sequence[str], demonstrator: Demonstrator, seed: int = 0) -> GoldStats:
    """Gold reward of a demonstrator's responses to `prompts` (a reference point for policies)."""
    rng = random.Random(f"{TASK_VERSION}|reference|{seed}")
    responses = [demonstrator(p, rng) for p in prompts]
    return GoldStats.of(
        [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)],
        num_words=[len(words(r)) for r in responses],
    )


def label_pairs(
    prompts: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    *,
    temperature: float,
    seed: int,
    gold: Callable[[str, str], float] = gold_reward,
) -> list[dict]:
    """Preference rows: for each pair, the winner drawn from P(a > b) = sigmoid((g_a - g_b) / T),
    with `g = gold(prompt, response)` (the task's gold reward by default).

    Pairs with identical responses, or an empty one, say nothing about preference and are dropped.
    """
    rng = random.Random(f"{TASK_VERSION}|labels|{seed}")
    rows = []
    for prompt, a, b in zip(prompts, first, second, strict=True):
        if a == b or not a.strip() or not b.strip():
            continue
        g_a, g_b = gold(prompt, a), gold(prompt, b)
        z = (g_a - g_b) / temperature
        p_a = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
        if rng.random() < p_a:
            rows.append(
                {"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": g_a, "gold_rejected": g_b}
            )
        else:
            rows.append(
                {"prompt": prompt, "chosen": b, "rejected": a, "gold_chosen": g_b, "gold_rejected": g_a}
            )
    return rows


def sample_preferences(
    model,
    tokenizer,
    n: int,
    *,
    split: str,
    seed: int,
    budget: DemoBudget,
) -> list[dict]:
    """`n` labelled pairs, two SFT samples per prompt of `split` ("train" or "heldout")."""
    rows: list[dict] = []
    round_ = 0
    while len(rows) < n:  # dropped pairs (identical responses) are made up with fresh prompts
        need = n - len(rows)
        prompts = sample_prompts(
            need + need // 8 + 4, f"preferences-{seed}-{round_}", split, task=budget.sft.task
        )
        doubled = [p for p in prompts for _ in range(2)]
        samples = sample_responses(
            model,
            tokenizer,
            doubled,
            max_new_tokens=budget.max_new_tokens,
            temperature=budget.temperature,
            seed=seed * 1000 + round_,
            batch_size=budget.generate_batch_size,
        )
        rows += label_pairs(
            prompts,
            samples.responses[0::2],
            samples.responses[1::2],
            temperature=budget.label_temperature,
            seed=seed * 1000 + round_,
        )
        round_ += 1
    return rows[:n]


def label_agreement(rows: Sequence[dict]) -> float:
    """Fraction of pairs whose chosen response has the higher gold reward (ties count half)."""
    score = [
        1.0
        if r["gold_chosen"] > r["gold_rejected"]
        else 0.5
        if r["gold_chosen"] == r["gold_rejected"]
        else 0.0
        for r in rows
    ]
    return statistics.fmean(score)


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclass
class DemoData:
    """What `prepare` made: the SFT policy folder, the data files, measurements and timings."""

    policy: Path
    prompts_train: Path
    prompts_heldout: Path
    preferences: Path  # a folder with train.jsonl and test.jsonl
    report: dict = field(default_factory=dict)
    rm_backbone: Path | None = None  # the folder the RMs start from when it is not `policy`


def prepare(
    output: str | os.PathLike,
    budget: str | DemoBudget = "default",
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    measure: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoData:
    """The task side of `segppo demo`: SFT policy (cached), prompt sets and preference pairs.

    Writes `output/data/...` (see the module doc) and `output/data/task_report.json`. With
    `measure`, the report has the SFT policy's gold reward on the held-out prompts (mean ± s.e.,
    EOS rate) beside reference points: the demonstrator it imitates, a better one (p_correct 0.9)
    and the oracle.
    """
    budget = get_budget(budget)
    log = log or (lambda message: None)
    data_dir = Path(output) / "data"
    timings: dict[str, float] = {}

    start = time.perf_counter()
    policy = sft_policy(cache_dir, budget.sft, log=log)
    timings["sft"] = time.perf_counter() - start
    training = json.loads((policy / TRAINING_FILE).read_text())
    rm_backbone = None
    if budget.rm_backbone is not None:  # trained on the same task as the policy, whatever it names
        settings = dataclasses.replace(budget.rm_backbone, task=budget.sft.task)
        rm_backbone = sft_policy(cache_dir, settings, log=log)
        timings["rm_backbone"] = time.perf_counter() - start - timings["sft"]

    start = time.perf_counter()
    heldout = sample_prompts(budget.heldout_prompts, seed, "heldout", task=budget.sft.task)
    train = sample_prompts(budget.ppo_prompts, seed, "train", task=budget.sft.task)
    prompts_train = write_jsonl(data_dir / "prompts_train.jsonl", [{"prompt": p} for p in train])
    prompts_heldout = write_jsonl(data_dir / "prompts_heldout.jsonl", [{"prompt": p} for p in heldout])
    timings["prompts"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = load_tokenizer(policy)
    model = load_policy(policy, dtype="fp32").eval()
    pairs = sample_preferences(
        model, tokenizer, budget.preference_pairs, split="train", seed=seed, budget=budget
    )
    eval_pairs = sample_preferences(
        model, tokenizer, budget.eval_preference_pairs, split="heldout", seed=seed + 1, budget=budget
    )
    preferences = data_dir / "preferences"
    write_jsonl(preferences / "train.jsonl", pairs)
    write_jsonl(preferences / "test.jsonl", eval_pairs)
    timings["preferences"] = time.perf_counter() - start
    log(f"{len(pairs)} + {len(eval_pairs)} preference pairs in {timings['preferences']:.1f}s")

    report: dict = {
        "task_version": TASK_VERSION,
        "task": budget.sft.task,
        "budget": asdict(budget),
        "seed": seed,
        "sft_training": training,
        "rm_backbone_training": (
            json.loads((rm_backbone / TRAINING_FILE).read_text()) if rm_backbone is not None else None
        ),
        "preferences": {
            "train_pairs": len(pairs),
            "test_pairs": len(eval_pairs),
            "label_agreement_with_gold": label_agreement(pairs),
            "gold_ties": sum(r["gold_chosen"] == r["gold_rejected"] for r in pairs) / len(pairs),
        },
    }
    if measure:
        start = time.perf_counter()
        samples = sample_responses(
            model,
            tokenizer,
            heldout,
            max_new_tokens=budget.max_new_tokens,
            temperature=budget.temperature,
            seed=seed + 2,
            batch_size=budget.generate_batch_size,
        )
        scores = [gold_reward(p, r) for p, r in zip(heldout, samples.responses, strict=True)]
        sft_stats = GoldStats.of(scores, samples.has_eos, [len(words(r)) for r in samples.responses])
        report["gold_heldout"] = {
            "sft_policy": asdict(sft_stats),
            "demonstrator": asdict(demonstrator_gold(heldout, Demonstrator(budget.sft.p_correct), seed)),
            "better_demonstrator_p0.9": asdict(demonstrator_gold(heldout, Demonstrator(p_correct=0.9), seed)),
            "oracle": asdict(demonstrator_gold(heldout, Demonstrator.oracle(), seed)),
        }
        timings["measure"] = time.perf_counter() - start
        log(f"SFT gold on {len(heldout)} held-out prompts: {sft_stats}")
    report["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    atomic_write_json(data_dir / "task_report.json", report)
    return DemoData(policy, prompts_train, prompts_heldout, preferences, report, rm_backbone)
