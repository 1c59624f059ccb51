"""Loading rows: local files (.json, .jsonl, .parquet), folders of them, or hub datasets.

Everything goes through `datasets.load_dataset`, so a folder's splits come from its file names
(`train.jsonl`, `test.jsonl`, `data/train_prefs-00000-of-00001.parquet`, ...) or from the YAML
configs of a hub snapshot's README. A single file is the split "train".

`split_train_eval` gives the rows evaluation uses: the dataset's own test/validation split when
it has one, otherwise a seeded held-out fraction that is never part of the training rows.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset, load_dataset_builder
from datasets.exceptions import DatasetGenerationError

from segppo.data.layouts import ROW, UNREADABLE

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Suffixes that mark a source as a file the user meant, rather than a hub dataset name.
_FILE_LIKE_SUFFIXES = {*FILE_BUILDERS, ".csv", ".tsv", ".txt", ".arrow", ".gz"}

# Split names tried, in order, as a dataset's own evaluation split.
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "eval", "dev")


def _looks_like_path(source: str) -> bool:
    # Hub names are "name" or "owner/name"; anything else that is not on disk was meant as a path.
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES
    )


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _is_utf8(path: Path, chunk: int = 1 << 20) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while block := f.read(chunk):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def read_jsonl_tolerantly(path: Path) -> Dataset:
    """The rows of a JSONL file that `datasets` cannot read as a whole (a torn last line, a line
    that is not UTF-8, not JSON or not an object, a column of mixed types).

    Every line becomes one row, in order; a line that cannot be used becomes a row whose only
    value is its reason in the `UNREADABLE` column, so the layouts count it in the skip report.
    A value whose type differs from what most rows of its column hold is dropped the same way.
    """
    rows: list[dict] = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except json.JSONDecodeError as err:
            torn = number == len(lines)  # the file does not end with a newline
            problem = f"not JSON ({err.msg}{'; the last line is cut off' if torn else ''})"
        rows.append({UNREADABLE: f"line {number}: {problem}"} if problem else {**row, "_line": number})
    kinds: dict[str, Counter] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None and key not in (UNREADABLE, "_line"):
                kinds.setdefault(key, Counter())[_value_kind(value)] += 1
    usual = {key: counts.most_common(1)[0][0] for key, counts in kinds.items()}
    for row in rows:
        line = row.pop("_line", None)
        odd = [k for k, v in row.items() if k in usual and v is not None and _value_kind(v) != usual[k]]
        if odd:
            reason = f"line {line}: column {odd[0]!r} holds {_value_kind(row[odd[0]])}, not {usual[odd[0]]}"
            row.clear()
            row[UNREADABLE] = reason
    columns = [*usual, UNREADABLE]
    return Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def load_splits(source: str | Path, cache_dir: str | None = None) -> DatasetDict:
    """All splits of a local file, a local folder, or a hub dataset (by name)."""
    path = Path(source).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{path}: unsupported file type {path.suffix!r}; supported: {sorted(FILE_BUILDERS)}"
            )
        if path.suffix.lower() == ".jsonl" and not _is_utf8(path):
            return DatasetDict(train=read_jsonl_tolerantly(path))  # pyarrow would fail on reading a row
        try:
            return load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001  (datasets raises several kinds for one bad line)
            if path.suffix.lower() != ".jsonl":
                raise
            return DatasetDict(train=read_jsonl_tolerantly(path))
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        if not any(p.suffix.lower() in FILE_BUILDERS for p in files):
            found = sorted(str(p.relative_to(path)) for p in files)[:10]
            raise FileNotFoundError(f"{path} holds no {sorted(FILE_BUILDERS)} files; found {found}")
        return _load_folder(path, cache_dir)
    if _looks_like_path(str(source)):
        raise FileNotFoundError(f"no such file or folder: {path}")
    return load_dataset(str(source), cache_dir=cache_dir)  # a hub dataset name


def _load_folder(path: Path, cache_dir: str | None) -> DatasetDict:
    """A folder's splits (from its file names). datasets reads all of a folder's files with one set of
    columns, so splits whose columns differ (a test file with a column the train files lack) fail
    together; then each split is read on its own."""
    try:
        return load_dataset(str(path), cache_dir=cache_dir)
    except DatasetGenerationError:
        pass
    builder = load_dataset_builder(str(path), cache_dir=cache_dir)
    splits = {}
    for split, files in builder.config.data_files.items():
        try:
            read = load_dataset(builder.name, data_files={str(split): list(files)}, cache_dir=cache_dir)
        except DatasetGenerationError as err:
            cause = str(err.__cause__ or err).strip().splitlines()[-1]
            raise ValueError(
                f"{path}: the files of split {str(split)!r} cannot be read as one table ({cause})"
            ) from err
        splits[str(split)] = read[str(split)]
    return DatasetDict(splits)


def select_split(splits: DatasetDict, split: str, source: str | Path = "the dataset") -> Dataset:
    if split not in splits:
        raise ValueError(f"{source} has no split {split!r}; its splits are {sorted(splits)}")
    return splits[split]


def load_rows(
    source: str | Path, split: str = "train", max_samples: int | None = None, cache_dir: str | None = None
) -> Dataset:
    """One split of `source` (see `load_splits`), limited to its first `max_samples` rows."""
    dataset = select_split(load_splits(source, cache_dir), split, source)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def numbered(rows: Dataset) -> Dataset:
    """`rows` with each row's number (`layouts.ROW`), to be kept when some rows are picked out."""
    return rows if ROW in rows.column_names else rows.add_column(ROW, np.arange(len(rows)))


def own_eval_split(splits: DatasetDict, train_split: str) -> str | None:
    """The dataset's own evaluation split beside `train_split` (see `EVAL_SPLIT_NAMES`), if any."""
    # A split family such as UltraFeedback's train_prefs/test_prefs keeps its suffix.
    suffix = train_split[len("train") :] if train_split.startswith("train") else ""
    for name in EVAL_SPLIT_NAMES:
        for candidate in (name + suffix, name):
            if candidate in splits and candidate != train_split:
                return candidate
    return None


def eval_split_name(
    dataset: Dataset | DatasetDict, eval_split: str | None = None, train_split: str = "train"
) -> str | None:
    """The split `split_train_eval` evaluates on: `eval_split`, else the dataset's own test or
    validation split (a folder's `test.jsonl` is the split "test"); None when eval rows are held out
    of the training split."""
    if isinstance(dataset, DatasetDict):
        return eval_split or own_eval_split(dataset, train_split)
    if eval_split is not None:
        raise ValueError(f"eval_split={eval_split!r} needs a dataset with splits, got a single Dataset")
    return None


def split_train_eval(
    dataset: Dataset | DatasetDict,
    eval_split: str | None = None,
    eval_fraction: float = 0.02,
    seed: int = 0,
    train_split: str = "train",
) -> tuple[Dataset, Dataset]:
    """(train rows, eval rows), never overlapping.

    With a DatasetDict, `eval_split` (or else the dataset's own test/validation split) is the eval
    part. Otherwise a seeded `eval_fraction` of the rows (at least one) is held out; both parts
    keep the original row order.
    """
    name = eval_split_name(dataset, eval_split, train_split)
    if isinstance(dataset, DatasetDict):
        train = select_split(dataset, train_split)
        if name is not None:
            return train, select_split(dataset, name)
        dataset = train

    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(dataset) < 2:
        raise ValueError(f"cannot hold out eval rows from a dataset of {len(dataset)} rows")
    num_eval = min(max(1, round(eval_fraction * len(dataset))), len(dataset) - 1)
    order = np.random.default_rng(seed).permutation(len(dataset))
    eval_rows, train_rows = np.sort(order[:num_eval]), np.sort(order[num_eval:])
    dataset = numbered(dataset)
    return dataset.select(train_rows), dataset.select(eval_rows)
