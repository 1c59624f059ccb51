"""What `segppo data inspect` shows about a dataset, computed by the code the training commands read
data with: `sources` (splits and held-out rows, as rm train), `layouts` (detection, conversion and
the skip report) and `chat` (template, truncation, the stop), so that what it shows is what a run
will read.

Preference data is split as `rm train` splits it (`split_train_eval` with the same options);
prompt data is one split, as `ppo train` and `eval` read it. With a tokenizer, one row is rendered
as token ids decoded back to text (the prompt with the chat template's generation prompt, then each
response up to its stop token), truncated as a run would truncate it, and the token lengths of the
first `length_rows` kept rows are measured untruncated and compared with the limits.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from segppo.config_data import DataInspectConfig

from .chat import ChatFormat
from .layouts import (
    ROW,
    LayoutOptions,
    SkipReport,
    detect_preference_layout,
    to_preference_examples,
    to_prompt_examples,
)
from .sources import load_splits, own_eval_split, select_split, split_train_eval


@dataclass
class Part:
    """One set of rows a run reads (rm train's training and eval rows, or the prompts)."""

    name: str
    source: str  # where its rows come from, in words
    rows: int
    report: SkipReport | None = None
    error: str | None = None  # why no row could be read
    examples: list = field(default_factory=list, repr=False)
    numbers: list[int] = field(default_factory=list, repr=False)  # its rows' numbers in their split


@dataclass
class Lengths:
    """Token lengths of one part of the measured rows, and how many exceed `limit`."""

    name: str
    values: list[int]
    limit: int | None = None
    limit_option: str = ""

    @property
    def over(self) -> int:
        return 0 if self.limit is None else sum(v > self.limit for v in self.values)

    def quantile(self, q: float) -> int:
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass
class RenderedText:
    """Token ids as the model reads them, decoded without dropping any special token."""

    name: str
    text: str
    tokens: int
    stop: str | None = None  # the stop token the ids end with, if any
    truncated: bool = False


@dataclass
class Example:
    part: str
    row: int
    prompt: RenderedText | None  # None without a tokenizer
    responses: list[RenderedText]
    messages: list[dict]  # the prompt's messages, as the layout read them
    response_texts: dict[str, str]  # the responses' text, as the layout read them


@dataclass
class DataInspection:
    source: str
    kind: str  # "preference" | "prompt"
    splits: dict[str, int]
    layout: str | None
    parts: list[Part]
    example: Example | None = None
    lengths: list[Lengths] = field(default_factory=list)
    measured_rows: int = 0
    stop_tokens: list[str] = field(default_factory=list)
    system_notes: list[str] = field(default_factory=list)
    max_len: int | None = None
    max_prompt_len: int | None = None


def _options(cfg: DataInspectConfig) -> LayoutOptions:
    return LayoutOptions(prompt_key=cfg.prompt_key, chosen_key=cfg.chosen_key, rejected_key=cfg.rejected_key)


def detect_kind(rows: Any, options: LayoutOptions) -> str:
    """ "preference" when the rows are preference pairs in a known layout, else "prompt"."""
    try:
        detect_preference_layout(rows, options)
    except ValueError:
        return "prompt"
    return "preference"


def _limited(rows, max_samples: int | None):
    return rows if max_samples is None else rows.select(range(min(max_samples, len(rows))))


def _preference_parts(cfg: DataInspectConfig, splits) -> list[tuple[Part, Any]]:
    """rm train's training and evaluation rows (`split_train_eval` with its options)."""
    train, evaluation = split_train_eval(
        splits,
        eval_split=cfg.eval_split,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        train_split=cfg.split,
    )
    train = _limited(train, cfg.max_samples)
    own = cfg.eval_split or own_eval_split(splits, cfg.split)
    if own is not None:
        why = "--eval-split" if cfg.eval_split else "the dataset's own"
        sources = (f"split {cfg.split!r}", f"split {own!r} ({why})")
    else:
        sources = (
            f"split {cfg.split!r} less the held-out rows",
            f"held out of split {cfg.split!r} (--eval-fraction {cfg.eval_fraction:g}, --seed {cfg.seed})",
        )
    if cfg.max_samples is not None:
        sources = (f"{sources[0]}, first --max-samples {cfg.max_samples}", sources[1])
    return [
        (Part("train", sources[0], len(train)), train),
        (Part("eval", sources[1], len(evaluation)), evaluation),
    ]


def _convert(part: Part, rows: Any, kind: str, options: LayoutOptions) -> str | None:
    """Convert `rows` as a run would: `part` gets the kept examples and the report. Returns the layout."""
    convert = to_preference_examples if kind == "preference" else to_prompt_examples
    part.numbers = rows[ROW] if ROW in rows.column_names else list(range(len(rows)))
    try:
        part.examples, part.report = convert(rows, options)
    except ValueError as err:  # no row of the part is usable: say why, show the other parts
        part.error = str(err)
        return None
    return part.report.layout


def _render(
    chat: ChatFormat, name: str, ids: list[int], has_eos: bool, truncated: bool = False
) -> RenderedText:
    tokenizer = chat.tokenizer
    stop = tokenizer.convert_ids_to_tokens(ids[-1]) if has_eos and ids else None
    return RenderedText(name, tokenizer.decode(ids, skip_special_tokens=False), len(ids), stop, truncated)


def _pick(cfg: DataInspectConfig, part: Part):
    """The kept example shown: `--row`'s, else the first."""
    if cfg.row is None:
        return part.examples[0]
    example = next((e for e in part.examples if e.row == cfg.row), None)
    if example is None:
        if cfg.row not in part.numbers:
            raise ValueError(f"--row {cfg.row} is not among the {part.name} rows ({part.source})")
        reasons = [r for r in part.report.reasons if r.startswith(f"row {cfg.row}:")]
        raise ValueError(f"--row {cfg.row} is skipped" + (f" ({reasons[0]})" if reasons else ""))
    return example


def _example(cfg: DataInspectConfig, kind: str, part: Part, chat: ChatFormat | None) -> Example:
    """The picked example as the model reads it (as messages only, without a tokenizer)."""
    example = _pick(cfg, part)
    if chat is None:
        return Example(part.name, example.row, None, [], example.prompt, _responses_of(example))
    if kind == "preference":
        pair = chat.encode_pair(example, max_len=cfg.max_len, max_prompt_len=cfg.max_prompt_len)
        prompt = _render(chat, "prompt", pair.prompt_ids, False, pair.prompt_truncated)
        responses = [
            _render(chat, "chosen", pair.chosen_ids, pair.chosen_has_eos, not pair.chosen_has_eos),
            _render(chat, "rejected", pair.rejected_ids, pair.rejected_has_eos, not pair.rejected_has_eos),
        ]
    else:
        encoded = chat.encode_prompt(example, max_prompt_len=cfg.max_prompt_len, on_long_prompt="truncate")
        prompt = _render(chat, "prompt", encoded.prompt_ids, False, encoded.truncated)
        responses = []
    return Example(part.name, example.row, prompt, responses, example.prompt, _responses_of(example))


def _responses_of(example: Any) -> dict[str, str]:
    return {name: getattr(example, name) for name in ("chosen", "rejected") if hasattr(example, name)}


def _lengths(cfg: DataInspectConfig, kind: str, examples: list, chat: ChatFormat) -> list[Lengths]:
    """Untruncated token lengths, against the limits a run truncates at."""
    if kind == "prompt":
        prompts = [len(chat.prompt_ids(e.prompt)) for e in examples]
        return [Lengths("prompt", prompts, cfg.max_prompt_len, "--max-prompt-len")]
    pairs = [chat.encode_pair(e) for e in examples]
    prompt = [len(p.prompt_ids) for p in pairs]
    chosen = [len(p.chosen_ids) for p in pairs]
    rejected = [len(p.rejected_ids) for p in pairs]
    total = [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected, strict=True)]
    return [
        Lengths("prompt", prompt, cfg.max_prompt_len, "--max-prompt-len"),
        Lengths("chosen", chosen),
        Lengths("rejected", rejected),
        Lengths("prompt + response", total, cfg.max_len, "--max-len"),
    ]


def _system_notes(examples: list, chat: ChatFormat) -> list[str]:
    folded = sum(chat.system_folded(e.prompt) for e in examples)
    if not folded:
        return []
    return [f"{folded} system prompts folded into the first user turn (the template has no system role)"]


def inspect_data(cfg: DataInspectConfig, tokenizer: Any = None) -> DataInspection:
    """The dataset `cfg.dataset` as the training commands read it; with `tokenizer` (else `cfg.model`'s,
    if given), rendered and measured in tokens."""
    splits = load_splits(cfg.dataset)
    options = _options(cfg)
    kind = cfg.kind
    if kind == "auto":
        kind = detect_kind(select_split(splits, cfg.split, cfg.dataset), options)
    if kind == "preference":
        parts_rows = _preference_parts(cfg, splits)
    else:
        rows = _limited(select_split(splits, cfg.split, cfg.dataset), cfg.max_samples)
        source = f"split {cfg.split!r}" + (
            f", first --max-samples {cfg.max_samples}" if cfg.max_samples else ""
        )
        parts_rows = [(Part("prompts", source, len(rows)), rows)]
    layouts = [_convert(part, rows, kind, options) for part, rows in parts_rows]
    parts = [part for part, _ in parts_rows]
    result = DataInspection(
        source=str(cfg.dataset),
        kind=kind,
        splits={name: len(rows) for name, rows in splits.items()},
        layout=next((layout for layout in layouts if layout), None),
        parts=parts,
        max_len=cfg.max_len if kind == "preference" else None,
        max_prompt_len=cfg.max_prompt_len,
    )
    if tokenizer is None and cfg.model is not None:
        from segppo.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    main = parts[0]
    if not main.examples:
        return result
    if tokenizer is None:
        result.example = _example(cfg, kind, main, None)
        return result
    chat = ChatFormat(tokenizer, cfg.chat_template, template_kwargs=cfg.chat_template_kwargs)
    result.stop_tokens = tokenizer.convert_ids_to_tokens(list(chat.stop_token_ids))
    result.example = _example(cfg, kind, main, chat)
    measured = main.examples[: cfg.length_rows]
    result.measured_rows = len(measured)
    result.lengths = _lengths(cfg, kind, measured, chat)
    result.system_notes = _system_notes(measured, chat)
    return result
