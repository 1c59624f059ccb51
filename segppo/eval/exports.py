"""Generations in the answer-file formats of the official benchmarks, to be judged unchanged.

One file per policy NAME under the eval's output folder:

`alpaca_eval/NAME/model_outputs.json` (AlpacaEval 2, single turn) — a JSON list, one object per
prompt in prompt order, what `alpaca_eval --model_outputs FILE` reads:
    {"instruction": first user turn's text, "output": response, "generator": NAME,
     "dataset": the row's `dataset` (only when the prompt rows have one)}
AlpacaEval matches outputs to its reference outputs by `instruction`, so run it on prompts loaded
from its own evaluation set. Only sample 0 is exported (AlpacaEval takes one output per
instruction).

`arena_hard/model_answer/NAME.jsonl` (Arena-Hard-Auto v0.1, single turn) — one line per question,
what its `gen_answer.py` writes and `gen_judgment.py`/`show_result.py` read:
    {"question_id", "answer_id", "model_id": NAME,
     "choices": [{"index": i, "turns": [{"content": response, "token_len": n}]}, ...],
     "tstamp", "conv_metadata": {"token_len", "header_count", "list_count", "bold_count"}}
Every sample is a choice (the judge reads choice 0). `conv_metadata` (style control) describes
choice 0; its markdown counts ignore fenced code blocks, as Arena-Hard's own. `token_len` counts
tokens with tiktoken's gpt-3.5-turbo encoding when tiktoken can load it, as Arena-Hard does, and
otherwise with the policy's tokenizer (results.json records which).

`mt_bench/model_answer/NAME.jsonl` (MT-Bench, FastChat `gen_model_answer.py`; only with
`--turns 2`) — one line per question:
    {"question_id", "answer_id", "model_id": NAME,
     "choices": [{"index": i, "turns": [turn-1 response, turn-2 response]}, ...], "tstamp"}
MT-Bench turns are plain strings (Arena-Hard's are `{"content": ...}` objects).

With `--turns 1` the AlpacaEval and Arena-Hard files are written; with `--turns 2` the MT-Bench
one (the other two are single-turn benchmarks). `question_id` is the prompt row's own id (its
`question_id`, else its row index); `answer_id` is a deterministic hash of the policy name, the
question id and the seed.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from segppo.io import atomic_write_text

from .prompts import EvalPrompt

ALPACA_EVAL_FILE = "alpaca_eval/{name}/model_outputs.json"
ARENA_HARD_FILE = "arena_hard/model_answer/{name}.jsonl"
MT_BENCH_FILE = "mt_bench/model_answer/{name}.jsonl"

_CODE_BLOCK = re.compile(r"```[^`]*```")
_MARKDOWN = {
    "header_count": {f"h{level}": re.compile(rf"^#{{{level}}}\s", re.MULTILINE) for level in range(1, 7)},
    "list_count": {
        "ordered": re.compile(r"^\s*\d+\.\s", re.MULTILINE),
        "unordered": re.compile(r"^\s*[-*+]\s", re.MULTILINE),
    },
    "bold_count": {"**": re.compile(r"\*\*[^*\n]+\*\*"), "__": re.compile(r"__[^_\n]+__")},
}


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """Headers by level, ordered/unordered list items and bold spans, outside fenced code blocks."""
    text = _CODE_BLOCK.sub("", text)
    return {
        group: {key: len(pattern.findall(text)) for key, pattern in patterns.items()}
        for group, patterns in _MARKDOWN.items()
    }


def tiktoken_counter() -> Callable[[str], int] | None:
    """Arena-Hard's token counter (tiktoken, gpt-3.5-turbo encoding), or None when unavailable."""
    try:
        import tiktoken

        encoding = tiktoken.encoding_for_model("gpt-3.5-turbo")
        encoding.encode("probe")
    except Exception:  # not installed, or its encoding file cannot be fetched offline
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def answer_id(name: str, question_id, seed: int) -> str:
    return hashlib.sha1(f"segppo/{name}/{question_id!r}/{seed}".encode()).hexdigest()[:22]


def alpaca_eval_rows(name: str, prompts: Sequence[EvalPrompt], outputs: Sequence[str]) -> list[dict]:
    """AlpacaEval `model_outputs.json` objects: one per prompt (`outputs[i]` answers `prompts[i]`)."""
    rows = []
    for prompt, output in zip(prompts, outputs, strict=True):
        row = {"instruction": prompt.instruction, "output": output, "generator": name}
        if prompt.dataset is not None:
            row["dataset"] = prompt.dataset
        rows.append(row)
    return rows


def arena_hard_rows(
    name: str,
    prompts: Sequence[EvalPrompt],
    choices: Sequence[Sequence[str]],
    token_len: Callable[[str], int],
    *,
    seed: int = 0,
    tstamp: float | None = None,
) -> list[dict]:
    """Arena-Hard v0.1 answer rows: `choices[i][s]` is sample `s` of the answer to `prompts[i]`."""
    tstamp = time.time() if tstamp is None else tstamp
    rows = []
    for prompt, samples in zip(prompts, choices, strict=True):
        rows.append(
            {
                "question_id": prompt.id,
                "answer_id": answer_id(name, prompt.id, seed),
                "model_id": name,
                "choices": [
                    {"index": i, "turns": [{"content": text, "token_len": token_len(text)}]}
                    for i, text in enumerate(samples)
                ],
                "tstamp": tstamp,
                "conv_metadata": {"token_len": token_len(samples[0]), **markdown_counts(samples[0])},
            }
        )
    return rows


def mt_bench_rows(
    name: str,
    prompts: Sequence[EvalPrompt],
    choices: Sequence[Sequence[Sequence[str]]],
    *,
    seed: int = 0,
    tstamp: float | None = None,
) -> list[dict]:
    """MT-Bench answer rows: `choices[i][s]` is the list of turn responses of sample `s`."""
    tstamp = time.time() if tstamp is None else tstamp
    return [
        {
            "question_id": prompt.id,
            "answer_id": answer_id(name, prompt.id, seed),
            "model_id": name,
            "choices": [{"index": i, "turns": list(turns)} for i, turns in enumerate(samples)],
            "tstamp": tstamp,
        }
        for prompt, samples in zip(prompts, choices, strict=True)
    ]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_exports(
    output_dir: Path,
    name: str,
    prompts: Sequence[EvalPrompt],
    choices: Sequence[Sequence[Sequence[str]]],
    *,
    turns: int,
    token_len: Callable[[str], int],
    seed: int = 0,
) -> dict[str, str]:
    """Write this policy's answer files; `choices[i][s][t]` is turn `t` of sample `s` on prompt `i`.

    Returns `{benchmark: path relative to output_dir}`.
    """
    output_dir = Path(output_dir)
    written: dict[str, str] = {}
    tstamp = time.time()
    if turns == 1:
        finals = [[sample[-1] for sample in samples] for samples in choices]
        path = ALPACA_EVAL_FILE.format(name=name)
        text = json.dumps(
            alpaca_eval_rows(name, prompts, [s[0] for s in finals]), indent=2, ensure_ascii=False
        )
        atomic_write_text(output_dir / path, text + "\n")
        written["alpaca_eval"] = path
        path = ARENA_HARD_FILE.format(name=name)
        rows = arena_hard_rows(name, prompts, finals, token_len, seed=seed, tstamp=tstamp)
        atomic_write_text(output_dir / path, _jsonl(rows))
        written["arena_hard"] = path
    else:
        path = MT_BENCH_FILE.format(name=name)
        atomic_write_text(
            output_dir / path, _jsonl(mt_bench_rows(name, prompts, choices, seed=seed, tstamp=tstamp))
        )
        written["mt_bench"] = path
    return written
