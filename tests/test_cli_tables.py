"""Results tables are whole at 80 columns and in a non-terminal stream: no cell is cut."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table
from segppo.cli.tables import fitted, print_table

from segppo.demo.compare import comparison_table, paired_table, results_table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def rendered(table: Table, width: int = 80) -> str:
    """What `print_table` writes to a non-terminal stream `width` columns wide."""
    stream = io.StringIO()
    print_table(Console(file=stream, width=width), table)
    return stream.getvalue()


def cells(table: Table) -> list[str]:
    return [str(cell) for column in table.columns for cell in column.cells]


def assert_whole(table: Table, output: str, width: int = 80) -> None:
    assert "…" not in output
    assert max(len(line) for line in output.splitlines()) <= width
    lines = output.splitlines()
    for cell in cells(table):
        assert any(cell in line for line in lines), f"cell {cell!r} is not on one line at {width} columns"


@pytest.mark.parametrize("name", ["demo_compare_animals.json", "demo_compare_pairs.json"])
@pytest.mark.parametrize("build", [results_table, comparison_table, paired_table])
def test_the_demo_tables_are_whole_at_80_columns(name, build):
    summary = json.loads((RESULTS / name).read_text())
    table = build(summary)
    output = rendered(table)
    assert_whole(table, output)
    # every row's name starts a row of every part, so a part is read without the first
    for row_name in table.columns[0].cells:
        assert output.count(f"│ {row_name} ") == len(fitted(table, Console(width=80)))


def test_a_table_that_fits_is_printed_as_it_is():
    summary = json.loads((RESULTS / "demo_compare_animals.json").read_text())
    table = results_table(summary)
    wide = Console(file=io.StringIO(), width=300)
    assert fitted(table, wide) == [table]
    assert len(fitted(table, Console(file=io.StringIO(), width=80))) > 1


def test_a_column_too_wide_for_any_split_becomes_name_value_lines():
    table = Table(title="results")
    for header in ("policy", "score", "notes"):
        table.add_column(header)
    table.add_row("sft", "0.25", "x" * 70 + " " + "y" * 10)
    table.add_row("ppo", "0.75", "fine")
    output = rendered(table)
    assert "…" not in output
    assert "sft\n  score: 0.25\n  notes: " in output and "ppo\n  score: 0.75\n  notes: fine" in output
    assert "x" * 70 in output


def test_the_default_console_of_a_pipe_is_80_columns(monkeypatch):
    """Why the 80-column test stands for a log file: rich gives a non-terminal stream 80 columns."""
    monkeypatch.delenv("COLUMNS", raising=False)
    console = Console(file=io.StringIO())
    assert not console.is_terminal and console.width == 80


def test_a_long_note_beside_its_name_wraps_between_words():
    """A name/value table whose value is a sentence (fit-normalizer's notes) wraps it, cutting nothing."""
    table = Table(show_header=False)
    table.add_column()
    table.add_column()
    note = "30 of 150 bins have fewer than 2 scores and were left out of the fit " * 2
    table.add_row("note", note)
    table.add_row("global score", "mean = 0.3512   std = 0.7928")
    output = rendered(table)
    assert "…" not in output and "│ note " in output  # still the table, not name: value lines
    assert " ".join(output.replace("│", " ").split()).count("left out of the fit") == 2
    assert "mean = 0.3512   std = 0.7928" in output
