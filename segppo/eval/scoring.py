"""Scoring generations: a segppo reward model (read as PPO reads it) or any Python callable.

Reward model: each response gets the RM's sequence score (the mean RM value at segment ends, as
in RM training) and the PPO reward, Σ_k n_k, the sum of its normalized segment rewards from
`segment_rewards` with the RM's normalizer (or `--normalizer`), i.e. the reward PPO would add to
the response before the KL penalty. Segments come from the RM's own segmenter, so every policy is
cut the same way.

When the policy shares the RM's tokenizer and chat template, the generated token ids are scored
as they are (exactly PPO's path). Otherwise the response text is re-encoded with the RM's chat
format, as PPO does for a bandit RM with its own tokenizer; a response that never reached its
stop token is scored without one (`has_eos` false).

Callable (`--scorer module:function` or `--scorer path/to/file.py:function`): `f(prompts,
responses) -> list[float]`, where each prompt is the user's text when the conversation is a
single user message and the message list (`[{"role", "content"}, ...]`, earlier turns included)
otherwise, and each response is the text of the final turn.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from segppo.data import ChatFormat, collate_responses
from segppo.kernels import segment_rewards
from segppo.rm.scoring import RewardScorer, encode_for_reward_model, resolve_normalizer, same_vocabulary

ScorerFn = Callable[[list, list[str]], Sequence[float]]


@dataclass
class ScoreSet:
    """Scores of N responses; the RM-only fields are None for a callable scorer."""

    score: list[float]
    normalized_reward: list[float] | None = None
    num_segments: list[int] | None = None
    scored_tokens: list[int] | None = None  # response tokens as the RM read them


@dataclass
class ScoringItem:
    """What a scorer needs of one generation."""

    messages: list[dict]  # the final turn's prompt messages
    text: str  # the final turn's response text
    prompt_ids: list[int]  # the policy's prompt ids of the final turn
    response_ids: list[int]  # the policy's response ids (stop token included when has_eos)
    has_eos: bool

    @property
    def prompt(self) -> str | list[dict]:
        """A single user message as its text, anything longer as messages (the callable's view)."""
        if len(self.messages) == 1 and self.messages[0]["role"] == "user":
            return self.messages[0]["content"]
        return [dict(m) for m in self.messages]


# ---------------------------------------------------------------------------------------------
# Callables


def _import_file(spec: str, path: str):
    """The module of the Python file `path` (a `--scorer` given as `path/to/file.py:function`)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--scorer {spec}: no such file ({file.resolve()})")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_callable(spec: str) -> ScorerFn:
    """Import `module:function` or `path/to/file.py:function` (the function may be a dotted
    attribute path, e.g. `Class.method`)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--scorer must be module:function (e.g. mypkg.rewards:score), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            module = _import_file(spec, module_name)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"--scorer {spec}: cannot import module {module_name!r} ({err}); "
            "is it installed or on PYTHONPATH?"
        ) from err
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--scorer {spec}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"--scorer {spec}: {attr!r} is a {type(target).__name__}, not a callable")
    return target


def _as_number(value, index: int, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, numbers.Number):  # numpy scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = type(value).__name__
        raise ValueError(f"{where} returned {value!r} (a {kind}) for response {index}; want a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where} returned {value} for response {index}; scores must be finite")
    return value


def call_scorer(fn: ScorerFn, prompts: list, responses: list[str], where: str = "the scorer") -> list[float]:
    """Call `fn(prompts, responses)` and check it returned one finite number per response."""
    out = fn(prompts, responses)
    if isinstance(out, torch.Tensor):
        out = out.reshape(-1).tolist()
    try:
        out = list(out)
    except TypeError as err:
        raise ValueError(f"{where} returned {type(out).__name__}, not a list of numbers") from err
    if len(out) != len(responses):
        raise ValueError(f"{where} returned {len(out)} scores for {len(responses)} responses")
    return [_as_number(v, i, where) for i, v in enumerate(out)]


class CallableScorer:
    """Scores with `fn(prompts, responses) -> list[float]` (see the module doc for the arguments)."""

    kind = "callable"

    def __init__(self, fn: ScorerFn, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def score(self, items: Sequence[ScoringItem], batch_size: int | None = None) -> ScoreSet:
        prompts = [item.prompt for item in items]
        texts = [item.text for item in items]
        return ScoreSet(score=call_scorer(self.fn, prompts, texts, where=f"--scorer {self.name}"))

    def describe(self) -> dict:
        return {"kind": "callable", "scorer": self.name}


# ---------------------------------------------------------------------------------------------
# Reward models


class RewardModelScorer:
    """A segppo reward model: sequence score, PPO-normalized reward and segment counts."""

    kind = "reward_model"

    def __init__(
        self,
        scorer: RewardScorer,
        *,
        path: str | None = None,
        normalize: bool = True,
        normalizer: str | None = None,
        reward_mean: float | None = None,
        reward_std: float | None = None,
        sigma_floor: float | None = None,
        max_prompt_len: int | None = None,
    ):
        self.scorer = scorer
        self.path = path
        # As PPO picks it, so normalized_reward is the reward PPO would add.
        choice = resolve_normalizer(
            scorer.metadata,
            scorer.segmentation,
            normalize=normalize,
            normalizer=normalizer,
            reward_mean=reward_mean,
            reward_std=reward_std,
            sigma_floor=sigma_floor,
        )
        self.params, self.sigma_floor, self.normalizer_source = (
            choice.params,
            choice.sigma_floor,
            choice.source,
        )
        self.max_prompt_len = max_prompt_len

    @property
    def chat(self) -> ChatFormat:
        return self.scorer.chat

    def reads_policy_ids(self, tokenizer, chat: ChatFormat) -> bool:
        """Whether the policy's token ids are what the RM would read (same vocabulary, template and
        template variables)."""
        return (
            same_vocabulary(tokenizer, self.scorer.tokenizer)
            and chat.template == self.chat.template
            and chat.template_kwargs == self.chat.template_kwargs
        )

    def shares_tokenizer(self, tokenizer) -> bool:
        return same_vocabulary(tokenizer, self.scorer.tokenizer)

    def _encode(self, item: ScoringItem, direct: bool) -> tuple[list[int], list[int], bool]:
        if direct:
            return item.prompt_ids, item.response_ids, item.has_eos
        return encode_for_reward_model(self.chat, item.messages, item.text, item.has_eos, self.max_prompt_len)

    def score(self, items: Sequence[ScoringItem], batch_size: int = 16, *, direct: bool = False) -> ScoreSet:
        """Score `items`; `direct` scores the policy's ids as they are (see `reads_policy_ids`)."""
        encoded = [self._encode(item, direct) for item in items]
        # Similar lengths together: less padding; the batches depend on the items, not on their order.
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]) + len(encoded[i][1]), i))
        score = [0.0] * len(items)
        normalized = [0.0] * len(items)
        segments = [0] * len(items)
        tokens = [0] * len(items)
        seg = self.scorer.segmentation
        pad = self.chat.pad_token_id
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate_responses(*zip(*(encoded[i] for i in rows), strict=True), pad)
            out = self.scorer.score(batch)
            mask = batch.response_mask.to(out.rm_values.device)
            has_eos = batch.has_eos.to(out.rm_values.device)
            rewards = segment_rewards(
                out.rm_values.float(),
                out.entropy.float(),
                mask,
                granularity=seg.granularity,
                threshold=seg.threshold,
                has_eos=has_eos,
                normalizer=self.params,
                sigma_floor=self.sigma_floor,
                distribute="end",  # n_k at its segment's end: the row sum is Σ_k n_k exactly
            )
            values = zip(
                out.scores.float().tolist(),
                rewards.rewards.sum(-1).tolist(),
                rewards.num_segments.tolist(),
                mask.sum(-1).tolist(),
                strict=True,
            )
            for i, (s, n, k, t) in zip(rows, values, strict=True):
                score[i], normalized[i], segments[i], tokens[i] = float(s), float(n), int(k), int(t)
        return ScoreSet(
            score=score, normalized_reward=normalized, num_segments=segments, scored_tokens=tokens
        )

    def describe(self) -> dict:
        return {
            "kind": "reward_model",
            "reward_model": self.path,
            "granularity": self.scorer.segmentation.granularity,
            "threshold": self.scorer.segmentation.threshold,
            "segmenter": self.scorer.segmenter_name,
            "normalizer": list(self.params) if self.params is not None else None,
            "normalizer_source": self.normalizer_source,
            "sigma_floor": self.sigma_floor,
        }
