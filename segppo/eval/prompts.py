"""Evaluation prompts: the PPO prompt layouts, plus the benchmarks' own question files.

Accepted rows (first match wins; `prompt_key` forces a column):

- the prompt layouts of `segppo.data` (`prompt` string or messages, `chosen` conversation or HH
  string), converted by the same `to_prompt_examples` PPO uses;
- `turns`: MT-Bench and Arena-Hard v0.1 `question.jsonl` rows, a list of user messages given as
  strings (MT-Bench) or `{"content": ...}` dicts (Arena-Hard). `--turns 1` uses the first;
  `--turns 2` needs two and generates both;
- `instruction`: AlpacaEval's evaluation set (`alpaca_eval.json`: `instruction`, `dataset`, ...),
  and Alpaca-format rows, whose non-empty `input` follows the instruction after a blank line.

Each prompt keeps its row's id (`question_id` when the row has one, else the row index) for the
benchmark exports, and the text of its first user turn (`instruction`) for AlpacaEval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from segppo.data import LayoutOptions, SkipReport, load_rows, to_prompt_examples

ID_KEY = "question_id"
INPUT_KEY = "input"  # Alpaca-format rows: the instruction's material, appended to it


@dataclass
class EvalPrompt:
    """One evaluation prompt: first-turn messages and, for `--turns 2`, the follow-up user turns."""

    index: int  # position in the evaluation set (0..N-1): seeds and pairing use it
    id: Any  # the row's `question_id`, else its row index
    messages: list[dict]  # the first turn's prompt messages (system messages allowed)
    followups: list[str] = field(default_factory=list)  # later user turns, one per extra turn
    row: int | None = None  # index of the source row
    dataset: str | None = None  # the row's `dataset` field (AlpacaEval keeps it)
    category: str | None = None

    @property
    def instruction(self) -> str:
        """The first user turn's text (AlpacaEval's `instruction`)."""
        return self.messages[-1]["content"]


def _turn_text(turn: Any, where: str) -> str:
    if isinstance(turn, Mapping):
        turn = turn.get("content")
    if not isinstance(turn, str) or not turn.strip():
        raise ValueError(f"{where} is not a non-empty string or {{'content': string}}")
    return turn


def _row_id(row: Mapping, index: int) -> Any:
    value = row.get(ID_KEY)
    return index if value is None else value


def _column_names(rows) -> list[str]:
    names = getattr(rows, "column_names", None)
    return list(names) if names is not None else (list(rows[0]) if len(rows) else [])


def detect_eval_layout(rows, prompt_key: str | None = None) -> str:
    """`turns`, `instruction`, or `prompt` (any of `segppo.data`'s prompt layouts)."""
    columns = _column_names(rows)
    if prompt_key is not None:
        return "turns" if prompt_key == "turns" else "prompt"
    if "turns" in columns:
        return "turns"
    if "prompt" not in columns and "chosen" not in columns and "instruction" in columns:
        return "instruction"
    return "prompt"


def prompts_from_rows(
    rows, *, prompt_key: str | None = None, turns: int = 1
) -> tuple[list[EvalPrompt], SkipReport]:
    """Convert rows to `EvalPrompt`s; malformed rows are skipped and counted in the report."""
    layout = detect_eval_layout(rows, prompt_key)
    if turns > 1 and layout != "turns":
        raise ValueError(
            f"--turns {turns} needs rows with a `turns` list of {turns} user messages (MT-Bench's "
            f"question.jsonl); these rows have keys {sorted(_column_names(rows))}"
        )
    prompts: list[EvalPrompt] = []
    if layout == "turns":
        report = SkipReport(layout="turns")
        for index, row in enumerate(rows):
            report.total += 1
            try:
                value = row.get("turns")
                if not isinstance(value, list) or len(value) < turns:
                    raise ValueError(f"`turns` is not a list of at least {turns} user message(s)")
                texts = [_turn_text(t, f"turns[{i}]") for i, t in enumerate(value[:turns])]
            except ValueError as err:
                report.skip(index, str(err))
                continue
            prompts.append(
                EvalPrompt(
                    index=len(prompts),
                    id=_row_id(row, index),
                    messages=[{"role": "user", "content": texts[0]}],
                    followups=texts[1:],
                    row=index,
                    category=row.get("category"),
                )
            )
        if not prompts:
            raise ValueError(f"no usable prompt rows: {report}")
        return prompts, report

    key = "instruction" if layout == "instruction" else prompt_key
    examples, report = to_prompt_examples(rows, LayoutOptions(prompt_key=key))
    if layout == "instruction":  # read as a prompt column, but results.json says which one
        report.layout = layout
    for example in examples:
        row = rows[example.row]
        extra = row.get(INPUT_KEY) if layout == "instruction" else None
        if isinstance(extra, str) and extra.strip():  # Alpaca's format: what the instruction works on
            example.prompt[-1]["content"] += "\n\n" + extra
        prompts.append(
            EvalPrompt(
                index=len(prompts),
                id=_row_id(row, example.row),
                messages=example.prompt,
                row=example.row,
                dataset=row.get("dataset"),
                category=row.get("category"),
            )
        )
    return prompts, report


def load_eval_prompts(
    source: str,
    *,
    split: str = "train",
    max_samples: int | None = None,
    prompt_key: str | None = None,
    turns: int = 1,
) -> tuple[list[EvalPrompt], SkipReport]:
    """Load and convert an evaluation prompt set (a file, a folder or a hub dataset)."""
    rows = load_rows(source, split=split, max_samples=max_samples)
    if len(rows) == 0:
        raise ValueError(f"{source}: the prompt set is empty")
    prompts, report = prompts_from_rows(rows, prompt_key=prompt_key, turns=turns)
    ids = [p.id for p in prompts]
    if len(set(map(repr, ids))) != len(ids):
        raise ValueError(f"{source}: `{ID_KEY}` values repeat; the benchmark exports need unique ids")
    return prompts, report
