"""Model refs: ``NAME`` (newest version), ``NAME@3`` (version 3), ``NAME@production`` (alias)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from genloop.errors import GenloopError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class RefError(GenloopError):
    exit_code = 2


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None  # NAME@3
    alias: str | None = None  # NAME@production

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name.endswith("."):
        raise RefError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_RE.fullmatch(alias):
        raise RefError(
            f"invalid alias {alias!r}: start with a letter; then letters, digits, '_' or '-'"
        )
    return alias


def parse_ref(text: str) -> ModelRef:
    """Parse ``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS``; raise naming what is wrong."""
    name, sep, tail = text.strip().partition("@")
    check_name(name)
    if not sep:
        return ModelRef(name)
    if tail.isascii() and tail.isdigit():  # str.isdigit() alone also accepts '²', '٣'…
        version = int(tail)
        if version < 1:
            raise RefError(f"invalid model ref {text!r}: versions start at 1")
        return ModelRef(name, version=version)
    if not tail:
        raise RefError(f"invalid model ref {text!r}: nothing after '@'")
    return ModelRef(name, alias=check_alias(tail))
