"""(being built)."""

from __future__ import annotations


def optimize() -> None:
    """(being built)."""
    from genloop.errors import GenloopError

    raise GenloopError("not built yet")
