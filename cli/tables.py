"""Results tables whole at any width: a log, a pipe, an 80-column terminal.

rich squeezes a table wider than its console by wrapping and then cutting cells (`sett…`,
`-0.2…`); written to a file, a console is 80 columns wide. `print_table` prints a table as it is
when it fits; otherwise as several tables that each repeat its first column (the row's name) and
take as many of the other columns as fit; when even one more column does not fit beside the
first, as it is with its text wrapped between words (a long note), or, if a word is still too
wide, as `name: value` lines.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, RenderableType
from rich.table import Column, Table
from rich.text import Text

# Wide enough that a table's measurement is its natural width, never clamped to the console's.
_UNBOUNDED = 100_000


def natural_width(table: Table, console: Console) -> int:
    """Columns the table needs with no cell wrapped or cut."""
    return table.__rich_measure__(console, console.options.update_width(_UNBOUNDED)).maximum


def wrapped_width(table: Table, console: Console) -> int:
    """Columns the table needs with its cells wrapped between words (its longest words whole)."""
    return table.__rich_measure__(console, console.options.update_width(_UNBOUNDED)).minimum


def _rows(table: Table) -> list[list[RenderableType]]:
    cells = [list(column.cells) for column in table.columns]
    return [list(row) for row in zip(*cells, strict=True)] if cells else []


def _sub_table(table: Table, columns: Sequence[int], title: str | None) -> Table:
    part = Table(title=title, box=table.box, show_header=table.show_header, show_lines=table.show_lines)
    source: list[Column] = table.columns
    for i in columns:
        c = source[i]
        part.add_column(c.header, justify=c.justify, style=c.style, no_wrap=c.no_wrap)
    for row in _rows(table):
        part.add_row(*(row[i] for i in columns))
    return part


def _column_groups(table: Table, console: Console) -> list[list[int]] | None:
    """The other columns in groups that each fit beside the first one; None if one cannot."""
    groups: list[list[int]] = []
    for i in range(1, len(table.columns)):
        if groups and natural_width(_sub_table(table, [0, *groups[-1], i], None), console) <= console.width:
            groups[-1].append(i)
        elif natural_width(_sub_table(table, [0, i], None), console) <= console.width:
            groups.append([i])
        else:
            return None
    return groups


def _plain(cell: RenderableType) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _lines(table: Table) -> Text:
    """`name: value` lines: each row's first cell, then its other cells under their headers."""
    headers = [_plain(c.header) for c in table.columns]
    text = Text()
    if table.title:
        text.append(_plain(table.title) + "\n", style="bold")
    for row in _rows(table):
        text.append(_plain(row[0]) + "\n", style="bold")
        for header, cell in zip(headers[1:], row[1:], strict=True):
            text.append(f"  {header}: {_plain(cell)}\n")
    return text


def fitted(table: Table, console: Console) -> list[RenderableType]:
    """What `print_table` prints for `table` on `console` (see the module doc)."""
    if natural_width(table, console) <= console.width or len(table.columns) < 2:
        return [table]
    groups = _column_groups(table, console)
    if groups is None:  # a column too wide to stand beside the first: wrap its text, or list it
        return [table] if wrapped_width(table, console) <= console.width else [_lines(table)]
    title = _plain(table.title) if table.title else None
    return [
        _sub_table(table, [0, *group], title if n == 0 else (f"{title} (continued)" if title else None))
        for n, group in enumerate(groups)
    ]


def print_table(console: Console, table: Table) -> None:
    for part in fitted(table, console):
        console.print(part)
