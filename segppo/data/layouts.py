"""Dataset layouts: detect how rows are laid out and convert each row to one canonical example.

Preference layouts (`PREFERENCE_LAYOUTS`):

- `conversation`: `chosen` and `rejected` are whole conversations (lists of `{role, content}`);
  the last message is the assistant response and the messages before it are the prompt, which
  must be the same in both (preference_700K, UltraFeedback; a `prompt` column, if any, is ignored).
- `prompt_response`: `prompt` is a string or a message list; `chosen`/`rejected` are strings, or
  conversations of which only the last (assistant) message is used.
- `hh`: Anthropic HH strings of `\\n\\nHuman:` / `\\n\\nAssistant:` turns; the last Assistant turn
  is the response and the earlier turns become user/assistant prompt messages.

Prompt layouts (`PROMPT_LAYOUTS`, for PPO and eval): `prompt` as a string or a conversation
(system messages allowed), or a `chosen` conversation (or HH string) whose prompt is everything
but its last message.

A margin comes from score columns when present (`chosen_score`/`rejected_score`,
`chosen-rating`/`rejected-rating` or `score_chosen`/`score_rejected`): margin = chosen - rejected.
Malformed rows are skipped; the `SkipReport` counts them and keeps the first few reasons.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PREFERENCE_LAYOUTS = ("conversation", "prompt_response", "hh")
PROMPT_LAYOUTS = ("prompt", "conversation", "hh")

# Score columns tried in order when the options name none.
SCORE_KEYS = (
    ("chosen_score", "rejected_score"),
    ("chosen-rating", "rejected-rating"),
    ("score_chosen", "score_rejected"),
)

ROLES = ("system", "user", "assistant")

# How many rows are looked at to tell a string column from a conversation column.
_DETECT_ROWS = 100


@dataclass
class PreferenceExample:
    """One preference pair: prompt messages, the two assistant responses, an optional margin."""

    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float | None = None
    row: int | None = None  # index of the source row, for messages


@dataclass
class PromptExample:
    """One prompt for generation: its messages (system messages allowed; ends with a user turn)."""

    prompt: list[dict]
    row: int | None = None  # index of the source row, for messages


@dataclass
class LayoutOptions:
    """Column names and layout; `None` means detect."""

    prompt_key: str | None = None
    chosen_key: str | None = None
    rejected_key: str | None = None
    chosen_score_key: str | None = None
    rejected_score_key: str | None = None
    layout: str | None = None
    strict: bool = False  # a malformed row is an error naming it, not a skip

    @property
    def prompt(self) -> str:
        return self.prompt_key or "prompt"

    @property
    def chosen(self) -> str:
        return self.chosen_key or "chosen"

    @property
    def rejected(self) -> str:
        return self.rejected_key or "rejected"


@dataclass
class SkipReport:
    """What happened to the rows of a dataset: the layout used, how many were skipped and why."""

    layout: str
    total: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first `max_reasons`, as "row i: why"
    truncated_prompts: int = 0
    truncated_responses: int = 0
    system_folded: int = 0  # system messages folded into the first user turn (the template drops them)
    max_reasons: int = 5

    @property
    def kept(self) -> int:
        return self.total - self.skipped

    def skip(self, row: int, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < self.max_reasons:
            self.reasons.append(f"row {row}: {reason}")

    def __str__(self) -> str:
        text = f"layout {self.layout}: kept {self.kept} of {self.total} rows"
        if self.truncated_prompts or self.truncated_responses:
            text += f" ({self.truncated_prompts} prompts and {self.truncated_responses} responses truncated)"
        if self.system_folded:
            text += f" (system prompts: {self.system_folded} folded into the first user turn)"
        if self.skipped:
            text += f", skipped {self.skipped}; first reasons: " + "; ".join(self.reasons)
        return text


class MalformedRow(ValueError):
    """A row that cannot be converted; the message says what is wrong with it."""


# Column a tolerant file reader (`sources.load_splits`) sets on a row it could not read, with why.
UNREADABLE = "_segppo_unreadable"
# Column of each row's number in its split, set before rows are picked out of it (held out, sampled),
# so that skip reasons, --strict and `data inspect --row` name the row as the file numbers it.
ROW = "_segppo_row"


def _check_readable(row: Mapping) -> None:
    if row.get(UNREADABLE):
        raise MalformedRow(row[UNREADABLE])


def _row_number(row: Any, position: int) -> int:
    """The row's number in its split (`ROW`), else its position among the rows given."""
    number = row.get(ROW) if isinstance(row, Mapping) else None
    return position if number is None else number


def _skip(report: SkipReport, options: LayoutOptions, index: int, reason: str) -> None:
    if options.strict:
        raise ValueError(f"--strict: row {index} is malformed: {reason}")
    report.skip(index, reason)


# ---------------------------------------------------------------------------------------------
# Messages


def check_messages(messages: Any, what: str) -> list[dict]:
    """Validate a message list and return plain `{role, content}` copies.

    Roles must be an optional leading system message, then user and assistant alternating from a
    user turn. Extra keys (Arrow fills absent struct fields with None) are dropped so that every
    code path renders exactly the same messages.
    """
    if not isinstance(messages, list) or not messages:
        raise MalformedRow(f"{what} is not a non-empty list of messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise MalformedRow(f"{what} message {i} is not a {{role, content}} dict")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise MalformedRow(f"{what} message {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise MalformedRow(f"{what} message {i} has non-string content ({type(content).__name__})")
        clean.append({"role": role, "content": content})

    turns = clean[1:] if clean[0]["role"] == "system" else clean
    expected = ["user", "assistant"]
    for i, message in enumerate(turns):
        if message["role"] != expected[i % 2]:
            roles = [m["role"] for m in clean]
            raise MalformedRow(f"{what} has wrong role order {roles} (want [system,] user, assistant, ...)")
    return clean


def _prompt_messages(value: Any, what: str) -> list[dict]:
    """A prompt given as a string (one user turn) or as messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise MalformedRow(f"{what} is empty")
        return [{"role": "user", "content": value}]
    messages = check_messages(value, what)
    if messages[-1]["role"] != "user":
        raise MalformedRow(f"{what} does not end with a user message")
    _check_prompt_turn(messages[-1], what)
    return messages


def _check_prompt_turn(message: dict, what: str) -> None:
    """The user turn a response answers is the prompt proper: empty, it is an empty prompt, as an
    empty string prompt is (earlier turns are history, kept as they are)."""
    if not message["content"].strip():
        raise MalformedRow(f"{what} is empty (its last user message)")


def _split_conversation(value: Any, what: str) -> tuple[list[dict], str]:
    """(prompt messages, response) of a whole conversation whose last message is the response."""
    messages = check_messages(value, what)
    if messages[-1]["role"] != "assistant":
        raise MalformedRow(f"{what} does not end with an assistant message")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise MalformedRow(f"{what} has no user prompt before the response")
    _check_prompt_turn(messages[-2], f"{what}'s prompt")
    return messages[:-1], _response_text(messages[-1]["content"], what)


def _response_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedRow(f"{what} response is not a string ({type(value).__name__})")
    if not value.strip():
        raise MalformedRow(f"{what} response is empty")
    return value


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh(text: Any, what: str = "conversation") -> list[dict]:
    """Messages of an Anthropic HH string; turn contents are stripped of surrounding whitespace."""
    if not isinstance(text, str):
        raise MalformedRow(f"{what} is not a string ({type(text).__name__})")
    if text.startswith("Human:"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise MalformedRow(f"{what} has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise MalformedRow(f"{what} has text before its first Human/Assistant turn")
    messages = [
        {"role": _HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)
    ]
    return check_messages(messages, what)


# ---------------------------------------------------------------------------------------------
# Detection


def _column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return [name for name in names if name not in (UNREADABLE, ROW)]
    # Rows without a schema: the keys of the first rows, so one malformed row does not decide.
    keys: dict[str, None] = {}
    for i in range(min(len(dataset), _DETECT_ROWS)):
        if isinstance(dataset[i], Mapping):
            keys.update(dict.fromkeys(dataset[i]))
    return list(keys)


def _first_value(dataset: Any, key: str) -> Any:
    """A typical value of a column among the first rows: one of the kind (text or message list)
    most of them hold, so that a malformed first row does not decide the layout of the others;
    else the first non-None value, else None."""
    by_kind: dict[str, list] = {}
    fallback = None
    for i in range(min(len(dataset), _DETECT_ROWS)):
        value = dataset[i].get(key) if isinstance(dataset[i], Mapping) else None
        if isinstance(value, str) and value:
            by_kind.setdefault("text", []).append(value)
        elif isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
            by_kind.setdefault("messages", []).append(value)
        elif fallback is None:
            fallback = value
    if by_kind:
        return max(by_kind.values(), key=len)[0]  # ties: the kind seen first
    return fallback


def _layout_error(dataset: Any, kind: str, detail: str) -> ValueError:
    if not len(dataset):  # no layout to name: an empty file or split
        return ValueError(f"no usable {kind} rows: there are no rows at all")
    expected = {
        "preference": (
            "(conversation) 'chosen'/'rejected' message lists; "
            "(prompt_response) 'prompt' + 'chosen' + 'rejected'; "
            "(hh) 'chosen'/'rejected' strings of '\\n\\nHuman:' / '\\n\\nAssistant:' turns"
        ),
        "prompt": (
            "(prompt) a 'prompt' string or message list; "
            "(conversation) a 'chosen' message list; (hh) a 'chosen' HH string"
        ),
    }[kind]
    first_keys = sorted(k for k in dataset[0] if k not in (UNREADABLE, ROW))
    return ValueError(
        f"no usable {kind} rows: {detail}. The first row has keys {first_keys}; expected layouts: "
        f"{expected}. Column names can be set with prompt_key/chosen_key/rejected_key."
    )


def detect_preference_layout(dataset: Any, options: LayoutOptions | None = None) -> str:
    """Which of `PREFERENCE_LAYOUTS` the rows use (`options.layout` wins when set)."""
    options = options or LayoutOptions()
    if options.layout is not None:
        if options.layout not in PREFERENCE_LAYOUTS:
            raise ValueError(f"unknown preference layout {options.layout!r}; one of {PREFERENCE_LAYOUTS}")
        return options.layout
    columns = _column_names(dataset)
    missing = [key for key in (options.chosen, options.rejected) if key not in columns]
    if missing:
        raise _layout_error(dataset, "preference", f"no column {missing}")
    if options.prompt_key is not None and options.prompt_key not in columns:
        raise _layout_error(dataset, "preference", f"no prompt column {options.prompt_key!r}")

    sample = _first_value(dataset, options.chosen)
    if isinstance(sample, str):
        return "prompt_response" if options.prompt in columns else "hh"
    if isinstance(sample, list):
        # A conversation of more than the response carries its own prompt (UltraFeedback's `prompt`
        # column repeats its first user turn); an explicit prompt_key still wins.
        if options.prompt_key is None and (len(sample) > 1 or options.prompt not in columns):
            return "conversation"
        return "prompt_response"
    raise _layout_error(
        dataset,
        "preference",
        f"column {options.chosen!r} holds {type(sample).__name__}, not text or messages",
    )


def detect_prompt_layout(dataset: Any, options: LayoutOptions | None = None) -> str:
    """Which of `PROMPT_LAYOUTS` the rows use (`options.layout` wins when set)."""
    options = options or LayoutOptions()
    if options.layout is not None:
        if options.layout not in PROMPT_LAYOUTS:
            raise ValueError(f"unknown prompt layout {options.layout!r}; one of {PROMPT_LAYOUTS}")
        return options.layout
    columns = _column_names(dataset)
    if options.prompt in columns:
        return "prompt"
    if options.prompt_key is None and options.chosen in columns:
        sample = _first_value(dataset, options.chosen)
        return "hh" if isinstance(sample, str) else "conversation"
    raise _layout_error(dataset, "prompt", f"no column {options.prompt!r} or {options.chosen!r}")


# ---------------------------------------------------------------------------------------------
# Conversion of one row


def _score_keys(columns: list[str], options: LayoutOptions) -> tuple[str, str] | None:
    if options.chosen_score_key or options.rejected_score_key:
        keys = (options.chosen_score_key, options.rejected_score_key)
        if None in keys or any(key not in columns for key in keys):
            raise ValueError(f"score columns {keys} are not both among the columns {columns}")
        return keys  # type: ignore[return-value]
    return next((keys for keys in SCORE_KEYS if keys[0] in columns and keys[1] in columns), None)


def _margin(row: Mapping, score_keys: tuple[str, str] | None) -> float | None:
    if score_keys is None:
        return None
    chosen, rejected = row[score_keys[0]], row[score_keys[1]]
    if chosen is None or rejected is None:
        return None
    for key, value in zip(score_keys, (chosen, rejected), strict=True):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedRow(f"{key} is not a number ({value!r})")
    margin = float(chosen) - float(rejected)
    return margin if math.isfinite(margin) else None


def _require(row: Mapping, key: str) -> Any:
    if key not in row or row[key] is None:
        raise MalformedRow(f"missing {key!r}")
    return row[key]


def _conversation_pair(row: Mapping, options: LayoutOptions) -> tuple[list[dict], str, str]:
    prompt, chosen = _split_conversation(_require(row, options.chosen), "chosen")
    rejected_prompt, rejected = _split_conversation(_require(row, options.rejected), "rejected")
    if rejected_prompt != prompt:
        raise MalformedRow("chosen and rejected conversations have different prompts")
    return prompt, chosen, rejected


def _last_response(value: Any, what: str) -> str:
    """A response given as a string, or as messages of which only the last (assistant's) is used."""
    if isinstance(value, list):
        last = value[-1] if value else None
        if not isinstance(last, Mapping) or last.get("role") != "assistant":
            raise MalformedRow(f"{what} does not end with an assistant message")
        value = last.get("content")
    return _response_text(value, what)


def _prompt_response_pair(row: Mapping, options: LayoutOptions) -> tuple[list[dict], str, str]:
    prompt = _prompt_messages(_require(row, options.prompt), "prompt")
    chosen = _last_response(_require(row, options.chosen), "chosen")
    rejected = _last_response(_require(row, options.rejected), "rejected")
    return prompt, chosen, rejected


def _hh_pair(row: Mapping, options: LayoutOptions) -> tuple[list[dict], str, str]:
    pairs = []
    for key, what in ((options.chosen, "chosen"), (options.rejected, "rejected")):
        messages = parse_hh(_require(row, key), what)
        pairs.append(_split_conversation(messages, what))
    (prompt, chosen), (rejected_prompt, rejected) = pairs
    if rejected_prompt != prompt:
        raise MalformedRow("chosen and rejected conversations have different prompts")
    return prompt, chosen, rejected


_PAIR_CONVERTERS: dict[str, Callable[[Mapping, LayoutOptions], tuple[list[dict], str, str]]] = {
    "conversation": _conversation_pair,
    "prompt_response": _prompt_response_pair,
    "hh": _hh_pair,
}


def _prompt_of_row(row: Mapping, layout: str, options: LayoutOptions) -> list[dict]:
    if layout == "prompt":
        return _prompt_messages(_require(row, options.prompt), "prompt")
    value = _require(row, options.chosen)
    messages = parse_hh(value, "chosen") if layout == "hh" else value
    return _split_conversation(messages, "chosen")[0]


# ---------------------------------------------------------------------------------------------
# Whole datasets


def to_preference_examples(
    dataset: Iterable[Mapping], options: LayoutOptions | None = None
) -> tuple[list[PreferenceExample], SkipReport]:
    """Convert every row to a `PreferenceExample`, skipping malformed rows (see the report).

    Raises ValueError naming the first row's keys when no row can be converted.
    """
    options = options or LayoutOptions()
    layout = detect_preference_layout(dataset, options)
    convert = _PAIR_CONVERTERS[layout]
    score_keys = _score_keys(_column_names(dataset), options)
    report = SkipReport(layout=layout)
    examples = []
    for position, row in enumerate(dataset):
        index = _row_number(row, position)
        report.total += 1
        try:
            _check_readable(row)
            prompt, chosen, rejected = convert(row, options)
            margin = _margin(row, score_keys)
        except MalformedRow as err:
            _skip(report, options, index, str(err))
            continue
        examples.append(PreferenceExample(prompt, chosen, rejected, margin, row=index))
    if not examples:
        raise _layout_error(
            dataset, "preference", f"all {report.total} rows are malformed as layout {layout!r} ({report})"
        )
    return examples, report


def to_prompt_examples(
    dataset: Iterable[Mapping], options: LayoutOptions | None = None
) -> tuple[list[PromptExample], SkipReport]:
    """Convert every row to a `PromptExample`, skipping malformed rows (see the report)."""
    options = options or LayoutOptions()
    layout = detect_prompt_layout(dataset, options)
    report = SkipReport(layout=layout)
    examples = []
    for position, row in enumerate(dataset):
        index = _row_number(row, position)
        report.total += 1
        try:
            _check_readable(row)
            examples.append(PromptExample(_prompt_of_row(row, layout, options), row=index))
        except MalformedRow as err:
            _skip(report, options, index, str(err))
    if not examples:
        raise _layout_error(
            dataset, "prompt", f"all {report.total} rows are malformed as layout {layout!r} ({report})"
        )
    return examples, report
