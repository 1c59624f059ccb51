"""The demo's synthetic task: a tiny instruction language whose gold reward is known exactly.

Prompts (words and punctuation separated by spaces, slot values capitalised; `parse_prompt` also
reads "describe: red fox ; mood: calm"):

    describe : [SIZE] [COLOR] ANIMAL [; mood : MOOD] [; place : PLACE]     (at least one extra slot)
    list N animals that are TRAIT [; not : ANIMAL]                         (N in two, three, four)

e.g. "describe : Big Red Fox ; mood : Calm" or "list three animals that are Fast ; not : Fox".
A response is a sequence of lower-case phrases, each ending with " .":

    animal ANIMAL .     color COLOR .     size SIZE .     mood MOOD .     place PLACE .    (slots)
    the ANIMAL is TRAIT .     (a list item)         i like it .  /  it VERB .     (filler)
    that is all .             (closing)

Gold reward = the sum of each phrase's local contribution + a length term (`phrase_rewards` lists
the contributions). For a `describe` prompt:

- a slot phrase of a slot the prompt sets: +1 when its value is the prompt's (the first time),
  -0.5 when it repeats an already-stated correct value, -1 when it contradicts the prompt;
- a slot phrase of a slot the prompt does not set, or a list item: -0.25 (unrequested);

for a `list` prompt:

- an item "the A is T ." with T the prompt's trait: +1 when A has T (the `TRAITS` table), is not
  excluded, was not listed yet and fewer than N correct items came before; -1 when A lacks T or is
  excluded; -0.5 for a repeat or an item beyond N. Another trait, or a slot phrase: -0.25;

for both:

- filler phrases: 0; the closing phrase "that is all ." as the last phrase: +0.25 (elsewhere 0);
- a phrase that matches no template (including an unfinished last phrase): -0.5;
- length: -0.1 per word (punctuation counts) beyond 24.

Example (`describe : Big Red Fox ; mood : Calm`):

    animal fox .     +1     (correct)
    color blue .     -1     (contradicts Red)
    mood calm .      +1     (correct)
    place cave .     -0.25  (place was not asked)
    that is all .    +0.25  (closing)
    -> 16 words, no length penalty: gold = 1.0

The `pairs` task (`--task pairs`) has one prompt kind whose phrases are right or wrong only as a
whole, the situation the paper argues segment-level rewards are for:

    list : COLOR ANIMAL ; COLOR ANIMAL [; COLOR ANIMAL]    (distinct colors, distinct animals)

e.g. "list : Red Fox ; Blue Owl". A response lists items "the COLOR ANIMAL ." and an item earns
+1 when (color, animal) is one of the prompt's pairs (the first time), -0.5 for a repeat, and
-1 otherwise; in particular a swap ("the blue fox .") has a color and an animal that are both in
the prompt, so neither word alone tells a right item from a wrong one. Other templates are
unrequested (-0.25); filler, closing, malformed and length are as above. Its demonstrator's wrong
items are mostly swaps.

Rewards come from phrases anywhere in the response, not only from its end, so credit assignment
matters: that is what the bandit/token/segment comparison is about. The layout is chosen so that
entropy segmentation finds the phrases: a reference model's entropy spikes where a value is chosen
(after a slot word, or after "the" in an item) and where the next phrase is chosen (after "."),
so segments come out as [slot word] [value .] and [the] [ANIMAL is TRAIT .]. Prompt values are
capitalised, a vocabulary of their own, so that a small model tells a prompt's value from a
response's when it compares them.

A noisy `Demonstrator` writes the SFT corpus: each required phrase is correct with probability
`p_correct` (0.5 for the SFT data), otherwise wrong, with unrequested, filler, repeated and
malformed phrases mixed in; its responses are 8-30 words. Prompts are assigned to the train or
held-out split by a fixed hash of their text (`is_heldout`), so held-out prompts are never seen by
SFT, reward-model or PPO training whatever the seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .prompts import (
    ANIMALS,
    COLORS,
    EXTRA_SLOTS,
    MOODS,
    NUMBERS,
    PLACES,
    SIZES,
    SLOT_VALUES,
    STRUCTURE_WORDS,
    TASK_VERSION,
    TASKS,
    TRAITS,
    VERBS,
    PromptError,
    TaskPrompt,
    check_task,
    is_heldout,
    parse_prompt,
    sample_prompt,
    sample_prompts,
    vocabulary,
    words,
)

# The prompt names are re-exported: callers import them from here.
__all__ = [
    "ANIMALS",
    "CLOSING",
    "COLORS",
    "CONTRADICTION",
    "CORRECT",
    "Corpus",
    "Demonstrator",
    "EXTRA_SLOTS",
    "LENGTH_COST",
    "LENGTH_TARGET",
    "MALFORMED",
    "MOODS",
    "NUMBERS",
    "PLACES",
    "Phrase",
    "PromptError",
    "REPEAT",
    "SIZES",
    "SLOT_VALUES",
    "STRUCTURE_WORDS",
    "TASKS",
    "TASK_VERSION",
    "TRAITS",
    "TaskPrompt",
    "UNREQUESTED",
    "VERBS",
    "check_task",
    "gold_reward",
    "gold_rewards",
    "is_heldout",
    "length_term",
    "parse_prompt",
    "phrase_rewards",
    "sample_prompt",
    "sample_prompts",
    "sft_corpus",
    "split_phrases",
    "vocabulary",
    "words",
]

# Gold reward constants.
CORRECT = 1.0
CONTRADICTION = -1.0
REPEAT = -0.5
UNREQUESTED = -0.25
MALFORMED = -0.5
CLOSING = 0.25
LENGTH_TARGET = 24
LENGTH_COST = 0.1


# ---------------------------------------------------------------------------------------------
# Responses and the gold reward


@dataclass
class Phrase:
    """One phrase of a response with what it says and what it earned."""

    words: list[str]
    kind: str  # slot | item | pair | filler | closing | malformed
    slot: str | None = None
    value: str | None = None
    animal: str | None = None  # items and pairs (a pair's value is its color)
    reward: float = 0.0
    reason: str = ""

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _classify(w: list[str]) -> Phrase:
    if not w or w[-1] != ".":
        return Phrase(w, "malformed", reason="unfinished phrase")
    body = w[:-1]
    n = len(body)
    if n == 2 and body[0] in SLOT_VALUES and body[1] in SLOT_VALUES[body[0]]:
        return Phrase(w, "slot", slot=body[0], value=body[1])
    if n == 4 and body[0] == "the" and body[1] in ANIMALS and body[2] == "is" and body[3] in TRAITS:
        return Phrase(w, "item", value=body[3], animal=body[1])
    if n == 3 and body[0] == "the" and body[1] in COLORS and body[2] in ANIMALS:
        return Phrase(w, "pair", value=body[1], animal=body[2])
    if body == ["i", "like", "it"] or (n == 2 and body[0] == "it" and body[1] in VERBS):
        return Phrase(w, "filler")
    if body == ["that", "is", "all"]:
        return Phrase(w, "closing")
    return Phrase(w, "malformed", reason="matches no phrase template")


def split_phrases(response: str) -> list[list[str]]:
    """The response's words cut after each '.'; a trailing piece without '.' is a phrase too."""
    phrases, current = [], []
    for word in words(response):
        current.append(word)
        if word == ".":
            phrases.append(current)
            current = []
    if current:
        phrases.append(current)
    return phrases


def phrase_rewards(prompt: str | TaskPrompt, response: str) -> list[Phrase]:
    """Each phrase of `response` with its gold contribution and the reason for it."""
    task = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    phrases = [_classify(w) for w in split_phrases(response)]
    stated: set[str] = set()  # describe: slots stated correctly; list: animals listed
    correct_items = 0
    for i, p in enumerate(phrases):
        if p.kind == "pair" and task.kind != "pairs":
            p.kind, p.reason = "malformed", "matches no phrase template of this prompt"
        if p.kind == "malformed":
            p.reward = MALFORMED
        elif p.kind == "filler":
            p.reason = "filler"
        elif p.kind == "closing":
            last = i == len(phrases) - 1
            p.reward, p.reason = (CLOSING, "closing") if last else (0.0, "closing not at the end")
        elif task.kind == "pairs":
            if p.kind != "pair":
                p.reward, p.reason = UNREQUESTED, "off-task"
            elif (p.value, p.animal) not in task.pairs:
                colors, animals = {c for c, _ in task.pairs}, {a for _, a in task.pairs}
                swap = p.value in colors and p.animal in animals
                p.reward, p.reason = CONTRADICTION, "swapped pair" if swap else "not a pair of the prompt"
            elif p.animal in stated:
                p.reward, p.reason = REPEAT, "repeat"
            else:
                stated.add(p.animal)
                p.reward, p.reason = CORRECT, "correct"
        elif task.kind == "describe":
            wanted = task.slot_values
            if p.kind == "item" or p.slot not in wanted:
                p.reward, p.reason = UNREQUESTED, "unrequested"
            elif p.value != wanted[p.slot]:
                p.reward, p.reason = CONTRADICTION, f"contradicts {p.slot} {wanted[p.slot]}"
            elif p.slot in stated:
                p.reward, p.reason = REPEAT, "repeat"
            else:
                stated.add(p.slot)
                p.reward, p.reason = CORRECT, "correct"
        else:  # list
            if p.kind != "item" or p.value != task.trait:
                p.reward, p.reason = UNREQUESTED, "off-task"
            elif p.animal == task.exclude:
                p.reward, p.reason = CONTRADICTION, "excluded"
            elif p.animal not in TRAITS[task.trait]:
                p.reward, p.reason = CONTRADICTION, f"{p.animal} is not {task.trait}"
            elif p.animal in stated:
                p.reward, p.reason = REPEAT, "repeat"
            elif correct_items >= task.count:
                p.reward, p.reason = REPEAT, "too many"
            else:
                stated.add(p.animal)
                correct_items += 1
                p.reward, p.reason = CORRECT, "correct"
    return phrases


def length_term(num_words: int) -> float:
    """-LENGTH_COST per word beyond LENGTH_TARGET."""
    return -LENGTH_COST * max(0, num_words - LENGTH_TARGET)


def gold_reward(prompt: str | TaskPrompt, response: str) -> float:
    """The gold reward: the phrases' contributions plus the length term (see the module doc).

    >>> gold_reward("describe : Big Red Fox ; mood : Calm", "animal fox . mood calm .")
    2.0
    >>> gold_reward("list two animals that are Fast", "the cat is fast . the dog is fast . that is all .")
    0.25
    """
    total = sum(p.reward for p in phrase_rewards(prompt, response))
    return round(total + length_term(len(words(response))), 6)


def gold_rewards(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """`gold_reward` of each (prompt, response); the `f(prompts, responses) -> scores` scorer form."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


# ---------------------------------------------------------------------------------------------
# The demonstrator


@dataclass(frozen=True)
class Demonstrator:
    """A noisy writer of responses. `p_correct` is the chance that a required phrase is right.

    The SFT corpus uses the defaults (mediocre: its mean gold reward is near 0); `Demonstrator(
    p_correct=0.9)` and `oracle()` are reference points for how much better a policy can get.
    """

    p_correct: float = 0.5
    p_omit: float = 0.1  # a required phrase is left out
    p_unrequested: float = 0.35  # an unrequested slot phrase is added
    p_filler: float = 0.3
    p_repeat: float = 0.1
    p_malformed: float = 0.06  # per phrase
    p_closing: float = 0.5
    p_shuffle: float = 0.3  # a describe or pairs prompt's phrases are written in a random order
    list_count_noise: float = 0.4  # a list has N-1 or N+1 items instead of N
    min_words: int = 8
    max_words: int = 30

    @classmethod
    def oracle(cls) -> Demonstrator:
        zero = dict(p_omit=0, p_unrequested=0, p_filler=0, p_repeat=0, p_malformed=0, list_count_noise=0)
        return cls(p_correct=1.0, p_closing=1.0, **zero)

    def __call__(self, prompt: str | TaskPrompt, rng: random.Random) -> str:
        task = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        write = {"describe": self._describe, "list": self._list, "pairs": self._pairs}[task.kind]
        phrases = write(task, rng)
        if rng.random() < self.p_filler:
            filler = ["i", "like", "it"] if rng.random() < 0.3 else ["it", rng.choice(VERBS)]
            phrases.insert(rng.randint(0, len(phrases)), filler)
        if phrases and rng.random() < self.p_repeat:
            phrases.insert(rng.randint(0, len(phrases)), list(rng.choice(phrases)))
        phrases = [self._corrupt(p, rng) if rng.random() < self.p_malformed else p for p in phrases]
        if rng.random() < self.p_closing:
            phrases.append(["that", "is", "all"])
        # Keep to `min_words`..`max_words` (the oracle's responses always are): pad with filler,
        # drop phrases from the middle.
        size = lambda: sum(len(p) + 1 for p in phrases)
        while size() < self.min_words:
            phrases.insert(rng.randint(0, len(phrases)), ["it", rng.choice(VERBS)])
        while size() > self.max_words:
            del phrases[rng.randrange(len(phrases) - 1)]
        return " ".join(" ".join([*p, "."]) for p in phrases)

    def _describe(self, task: TaskPrompt, rng: random.Random) -> list[list[str]]:
        slots = list(task.slots)
        if rng.random() < self.p_shuffle:
            rng.shuffle(slots)
        phrases = []
        for slot, value in slots:
            if rng.random() < self.p_omit:
                continue
            if rng.random() >= self.p_correct:
                value = rng.choice([v for v in SLOT_VALUES[slot] if v != value])
            phrases.append(_slot_phrase(slot, value))
        if rng.random() < self.p_unrequested:
            free = [s for s in EXTRA_SLOTS if s not in task.slot_values]
            if free:
                slot = rng.choice(free)
                phrases.insert(
                    rng.randint(0, len(phrases)), _slot_phrase(slot, rng.choice(SLOT_VALUES[slot]))
                )
        return phrases

    def _list(self, task: TaskPrompt, rng: random.Random) -> list[list[str]]:
        n = task.count
        if rng.random() < self.list_count_noise:
            n = max(1, n + rng.choice((-1, 1)))
        good = [a for a in TRAITS[task.trait] if a != task.exclude]
        bad = [a for a in ANIMALS if a not in good]
        rng.shuffle(good)
        phrases = []
        for _ in range(n):
            animal = good.pop() if good and rng.random() < self.p_correct else rng.choice(bad)
            phrases.append(["the", animal, "is", task.trait])
        return phrases

    def _pairs(self, task: TaskPrompt, rng: random.Random) -> list[list[str]]:
        pairs = list(task.pairs)
        if rng.random() < self.p_shuffle:
            rng.shuffle(pairs)
        colors = [c for c, _ in task.pairs]
        phrases = []
        for color, animal in pairs:
            if rng.random() < self.p_omit:
                continue
            if rng.random() >= self.p_correct:  # wrong: mostly another pair's color (a swap)
                others = [c for c in colors if c != color] if rng.random() < 0.75 else []
                color = rng.choice(others or [c for c in COLORS if c not in colors])
            phrases.append(["the", color, animal])
        return phrases

    @staticmethod
    def _corrupt(phrase: list[str], rng: random.Random) -> list[str]:
        phrase = list(phrase)
        i = rng.randrange(len(phrase))
        how = rng.randrange(3)
        if how == 0 and len(phrase) > 1:
            del phrase[i]
        elif how == 1:
            phrase.insert(i, phrase[i])
        else:
            j = rng.randrange(len(phrase))
            phrase[i], phrase[j] = phrase[j], phrase[i]
            if i == j:
                phrase.insert(i, rng.choice(STRUCTURE_WORDS[:-3]))
        return phrase


def _slot_phrase(slot: str, value: str) -> list[str]:
    return [slot, value]


@dataclass
class Corpus:
    """SFT examples: prompts and demonstrator responses, from the train split only."""

    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def sft_corpus(n: int, seed: int, demonstrator: Demonstrator | None = None, task: str = "animals") -> Corpus:
    """`n` (prompt, response) pairs on train-split prompts of `task`, deterministic under `seed`."""
    demonstrator = demonstrator or Demonstrator()
    prompts = sample_prompts(n, seed, "train", task=task)
    rng = random.Random(f"{TASK_VERSION}|demonstrator|{seed}" + ("" if task == "animals" else f"|{task}"))
    return Corpus(prompts, [demonstrator(p, rng) for p in prompts])
