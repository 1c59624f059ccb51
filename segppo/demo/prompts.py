"""The demo task's prompts: its words, the prompt grammar (`TaskPrompt`, `parse_prompt`), sampling
from each task's prompt distribution and the fixed held-out split. `segppo.demo.task` describes the
grammar and builds the gold reward and the demonstrator on top of this module."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from segppo.config import DEMO_TASKS

# Part of every cache key: change it with any change to prompts, responses or the gold reward.
TASK_VERSION = "animals-v2"
# The demo's gold tasks (`--task`) differ in their prompt distribution; the gold reward reads the
# prompt's kind.
TASKS = DEMO_TASKS

COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "gray")
SIZES = ("tiny", "small", "big", "huge")
MOODS = ("calm", "angry", "happy", "sad", "sleepy", "curious", "brave", "shy")
PLACES = ("forest", "river", "field", "hill", "lake", "cave", "garden", "city")
ANIMALS = ("fox", "cat", "dog", "owl", "bear", "wolf", "horse", "mouse", "fish", "frog", "deer", "hawk")
VERBS = ("runs", "sleeps", "eats", "swims", "jumps", "hides", "sings", "hunts")
NUMBERS = {"two": 2, "three": 3, "four": 4}
TRAITS = {
    "fast": ("fox", "dog", "wolf", "horse", "deer", "hawk"),
    "quiet": ("fox", "cat", "owl", "mouse", "fish", "deer"),
    "wild": ("fox", "owl", "bear", "wolf", "frog", "deer", "hawk"),
    "furry": ("fox", "cat", "dog", "bear", "wolf", "mouse"),
    "tame": ("cat", "dog", "horse", "fish", "mouse"),
}
SLOT_VALUES = {"animal": ANIMALS, "color": COLORS, "size": SIZES, "mood": MOODS, "place": PLACES}
EXTRA_SLOTS = ("size", "color", "mood", "place")
STRUCTURE_WORDS = (
    "describe", "list", "animals", "that", "are", "not",
    "animal", "color", "size", "mood", "place",
    "it", "is", "the", "i", "like", "all",
    ":", ";", ".",
)  # fmt: skip

_TOKEN = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """The task's words: lower-case runs of letters/digits, and each punctuation mark on its own."""
    return _TOKEN.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word of the task (prompts and responses), in a fixed order: the lower-case words, then
    the capitalised slot values that prompts use."""
    vocab = list(STRUCTURE_WORDS)
    for group in (COLORS, SIZES, MOODS, PLACES, ANIMALS, VERBS, tuple(NUMBERS), tuple(TRAITS)):
        vocab += [w for w in group if w not in vocab]
    for group in (COLORS, SIZES, MOODS, PLACES, ANIMALS, tuple(TRAITS)):
        vocab += [w.capitalize() for w in group if w.capitalize() not in vocab]
    return vocab


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class TaskPrompt:
    """A parsed prompt: `describe` with slot values, or `list` with count, trait and exclusion."""

    kind: str  # "describe" | "list" | "pairs"
    slots: tuple[tuple[str, str], ...] = ()  # describe: (slot, value) pairs, animal first
    count: int = 0  # list
    trait: str = ""  # list
    exclude: str | None = None  # list
    pairs: tuple[tuple[str, str], ...] = ()  # pairs: (color, animal)

    @property
    def slot_values(self) -> dict[str, str]:
        return dict(self.slots)

    def text(self) -> str:
        """The prompt as the task writes it: slot values capitalised (`Red Fox`), see `PROMPT_CASE`."""
        c = str.capitalize
        if self.kind == "pairs":
            return "list : " + " ; ".join(f"{c(color)} {c(animal)}" for color, animal in self.pairs)
        if self.kind == "list":
            number = next(k for k, v in NUMBERS.items() if v == self.count)
            text = f"list {number} animals that are {c(self.trait)}"
            return text + (f" ; not : {c(self.exclude)}" if self.exclude else "")
        values = self.slot_values
        head = " ".join(c(values[s]) for s in ("size", "color", "animal") if s in values)
        tail = "".join(f" ; {s} : {c(values[s])}" for s in ("mood", "place") if s in values)
        return f"describe : {head}{tail}"


class PromptError(ValueError):
    """A prompt outside the task's grammar."""


def parse_prompt(prompt: str) -> TaskPrompt:
    """The structure of a prompt in the task's grammar; raises PromptError otherwise."""
    w = words(prompt)
    if w[:2] == ["list", ":"]:
        parts = " ".join(w[2:]).split(" ; ")
        pairs = tuple(tuple(part.split()) for part in parts)
        if not 2 <= len(pairs) <= 3 or any(
            len(p) != 2 or p[0] not in COLORS or p[1] not in ANIMALS for p in pairs
        ):
            raise PromptError(f"not a pairs prompt (2 or 3 'Color Animal' separated by ';'): {prompt!r}")
        if len({p[0] for p in pairs}) < len(pairs) or len({p[1] for p in pairs}) < len(pairs):
            raise PromptError(f"a pairs prompt has distinct colors and animals: {prompt!r}")
        return TaskPrompt("pairs", pairs=pairs)
    if w[:1] == ["list"]:
        if len(w) < 6 or w[1] not in NUMBERS or w[2:5] != ["animals", "that", "are"] or w[5] not in TRAITS:
            raise PromptError(f"not a list prompt: {prompt!r}")
        exclude = None
        if len(w) > 6:
            if len(w) != 10 or w[6:9] != [";", "not", ":"] or w[9] not in ANIMALS:
                raise PromptError(f"bad exclusion in {prompt!r}")
            exclude = w[9]
        return TaskPrompt("list", count=NUMBERS[w[1]], trait=w[5], exclude=exclude)
    if w[:2] != ["describe", ":"]:
        raise PromptError(f"prompts start with 'describe :' or 'list': {prompt!r}")
    parts = " ".join(w[2:]).split(" ; ")
    slots: dict[str, str] = {}
    for word in parts[0].split():
        slot = next((s for s in ("size", "color", "animal") if word in SLOT_VALUES[s]), None)
        if slot is None or slot in slots:
            raise PromptError(f"unexpected {word!r} in {prompt!r}")
        slots[slot] = word
    if "animal" not in slots:
        raise PromptError(f"no animal in {prompt!r}")
    for part in parts[1:]:
        bits = part.split()
        if len(bits) != 3 or bits[0] not in ("mood", "place") or bits[1] != ":" or bits[0] in slots:
            raise PromptError(f"bad slot {part!r} in {prompt!r}")
        if bits[2] not in SLOT_VALUES[bits[0]]:
            raise PromptError(f"{bits[2]!r} is not a {bits[0]} in {prompt!r}")
        slots[bits[0]] = bits[2]
    ordered = tuple((s, slots[s]) for s in ("animal", *EXTRA_SLOTS) if s in slots)
    return TaskPrompt("describe", slots=ordered)


def sample_prompt(rng: random.Random, list_fraction: float = 0.25, task: str = "animals") -> TaskPrompt:
    """One prompt from `task`'s distribution (for `animals`, a quarter are `list` prompts by default)."""
    check_task(task)
    if task == "pairs":
        n = rng.choice((2, 3))
        return TaskPrompt(
            "pairs", pairs=tuple(zip(rng.sample(COLORS, n), rng.sample(ANIMALS, n), strict=True))
        )
    if rng.random() < list_fraction:
        trait = rng.choice(tuple(TRAITS))
        exclude = rng.choice(TRAITS[trait]) if rng.random() < 0.5 else None
        return TaskPrompt("list", count=rng.choice(tuple(NUMBERS.values())), trait=trait, exclude=exclude)
    extras = rng.sample(EXTRA_SLOTS, rng.randint(1, 3))
    values = {"animal": rng.choice(ANIMALS)} | {s: rng.choice(SLOT_VALUES[s]) for s in extras}
    return TaskPrompt(
        "describe", slots=tuple((s, values[s]) for s in ("animal", *EXTRA_SLOTS) if s in values)
    )


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; one of {list(TASKS)}")


def is_heldout(prompt: str, fraction: float = 0.2) -> bool:
    """Whether a prompt belongs to the held-out split: a fixed hash of its text, independent of seeds."""
    key = f"{TASK_VERSION}|{' '.join(words(prompt))}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < fraction


def sample_prompts(
    n: int, seed: int | str, split: str = "train", list_fraction: float = 0.25, task: str = "animals"
) -> list[str]:
    """`n` prompt texts of one split ("train" or "heldout"), drawn from the task's distribution
    restricted to that split (repeats possible: there are only ~200 distinct list prompts).
    Different seeds (ints or strings such as "preferences-0") give independent streams."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    check_task(task)
    # The animals task keeps its stream (its prompts are those of before there were two tasks).
    rng = random.Random(f"{TASK_VERSION}|{split}|{seed}" + ("" if task == "animals" else f"|{task}"))
    out = []
    while len(out) < n:
        text = sample_prompt(rng, list_fraction, task).text()
        if is_heldout(text) == (split == "heldout"):
            out.append(text)
    return out
