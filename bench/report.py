"""How a benchmark shows its result: a rich table at the terminal, and the same rows as a
markdown table to paste into RESULTS.md."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Collection, Sequence
from types import ModuleType

import torch
from rich.table import Table

from kdlab.markdown import markdown_table as kdlab_markdown_table


def rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[str] = ()) -> Table:
    """Columns named in ``left`` are left-aligned (labels); the rest, numbers, right-aligned."""
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(kdlab_markdown_table(header, rows))


def machine_line(*packages: ModuleType) -> str:
    """Where and with what a figure was measured: RESULTS.md records it beside every table."""
    versions = ", ".join(f"{package.__name__} {package.__version__}" for package in (torch, *packages))
    return f"{platform.machine()}, {os.cpu_count()} cores; {versions}; {time.strftime('%Y-%m-%d')}"
