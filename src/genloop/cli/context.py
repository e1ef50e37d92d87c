"""What the global options set, and the helpers every command uses to open and print."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from genloop.workspace import Workspace

console = Console()
err_console = Console(stderr=True)


@dataclass
class State:
    workspace: Path | None = None
    debug: bool = False


state = State()


def open_workspace() -> Workspace:
    from genloop.workspace import Workspace

    return Workspace.open(state.workspace)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, never wrapped or coloured."""
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, no_wrap=i == 0)  # the first column names the row: never cut
    for row in rows:
        table.add_row(*("" if v is None else escape(str(v)) for v in row))  # values, not markup
    console.print(table)
