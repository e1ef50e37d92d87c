"""JSON Lines read strictly: each row comes with ``path:line`` for error messages."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from genloop.errors import GenloopError


def parse_jsonl(lines: Iterable[str], path: Path | str) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "path:line", row)`` for each non-blank line.

    A line that is not JSON raises a GenloopError naming the file and line; what a valid
    row must contain is the caller's to check (it has ``where`` for its message).
    """
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenloopError(f"{where}: not valid JSON ({exc.msg})") from None
        yield lineno, where, row


def read_jsonl(path: Path) -> Iterator[tuple[int, str, Any]]:
    """:func:`parse_jsonl` over a UTF-8 file, streamed."""
    with path.open(encoding="utf-8") as f:
        yield from parse_jsonl(f, path)
