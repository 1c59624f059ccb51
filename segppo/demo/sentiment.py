"""The real-model demo's gold judge and prompts: positivity of reviews and short stories.

The gold reward of a response is VADER's compound sentiment score of its text (Hutto & Gilbert,
2014; the `vaderSentiment` package, whose lexicon and rules ship inside it), in [-1, 1]. It reads
the response only, so a prompt's wording does not move it. The prompts ask for reviews,
descriptions and short stories whose tone is left open, so that a policy can answer any of them
more or less positively; train and held-out prompts share no subject.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from functools import lru_cache

from segppo.models.gguf import GGUF_EXTRA, MissingExtra

TEMPLATES = (
    "Write a short review of {}.",
    "Describe your last visit to {} in two sentences.",
    "Tell a very short story about {}.",
    "What did you think of {}? Answer in one or two sentences.",
)
SUBJECTS = (
    "a small Italian restaurant",
    "the hotel you stayed at last week",
    "a new smartphone",
    "a pair of running shoes",
    "a coffee shop downtown",
    "a science fiction movie",
    "a public library",
    "a city park in autumn",
    "a train journey",
    "a local bakery",
    "a used bookstore",
    "a music festival",
    "a dentist's office",
    "a museum of modern art",
    "a budget airline",
    "a camping trip in the mountains",
    "a neighbourhood gym",
    "a cooking class",
    "a video game released this year",
    "an electric bicycle",
    "a beach town in winter",
    "a farmers' market",
    "a furniture store",
    "a theater play",
    "a sushi bar",
    "a children's playground",
    "a new laptop",
    "a hiking trail",
    "a car rental company",
    "a jazz concert",
    "an online language course",
    "a pizza delivery",
    "a zoo",
    "a hair salon",
    "a board game night",
    "a botanical garden",
    "a ski resort",
    "a street food market",
    "a pet store",
    "a history podcast",
    "a wedding you attended",
    "a ferry ride",
    "a vegetarian cafe",
    "a bike repair shop",
    "a television series",
    "a rooftop bar",
    "a weekend in a small village",
    "a science museum",
)
HELDOUT_EVERY = 4  # every fourth subject is held out: 12 of 48, never trained on


def prompts(split: str) -> list[str]:
    """Every prompt of `split` ("train": 36 subjects × 4 templates, "heldout": 12 × 4), in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    held = split == "heldout"
    subjects = [s for i, s in enumerate(SUBJECTS) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]
    return [t.format(s) for s in subjects for t in TEMPLATES]


def sample_prompts(n: int, split: str, seed: int) -> list[str]:
    """`n` prompts of `split`: each prompt once before any repeats, shuffled by `seed`."""
    pool = prompts(split)
    rng = random.Random(f"sentiment|{split}|{seed}")
    out: list[str] = []
    while len(out) < n:
        rng.shuffle(pool)
        out += pool[: n - len(out)]
    return out


@lru_cache(maxsize=1)
def _analyzer():
    if importlib.util.find_spec("vaderSentiment") is None:
        raise MissingExtra(f"the sentiment gold judge needs vaderSentiment: pip install -e '.[{GGUF_EXTRA}]'")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER's compound score of `text`, in [-1, 1] (0 for text with no sentiment words)."""
    return float(_analyzer().polarity_scores(text)["compound"])


def gold_scores(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """The gold reward of each response (`segppo eval`'s scorer signature; prompts are not read)."""
    return [sentiment(r) for r in responses]
