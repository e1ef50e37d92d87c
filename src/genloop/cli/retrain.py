"""(being built)."""

from __future__ import annotations


def retrain() -> None:
    """(being built)."""
    from genloop.errors import GenloopError

    raise GenloopError("not built yet")

def loop() -> None:
    """(being built)."""
    from genloop.errors import GenloopError

    raise GenloopError("not built yet")
