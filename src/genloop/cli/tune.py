"""(being built)."""

from __future__ import annotations


def tune() -> None:
    """(being built)."""
    from genloop.errors import GenloopError

    raise GenloopError("not built yet")
