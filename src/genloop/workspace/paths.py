"""Identifiers → paths that can never leave their root.

Every name that reaches the filesystem from a user, a config file or an HTTP request goes
through :func:`safe_join`. Segments are checked against a strict allow-list (so encoded
variants like ``%2e%2e`` or ``..%2f`` are refused outright rather than decoded), and the
resolved result must stay under the resolved root, which also stops symlinks that point out.
"""

from __future__ import annotations

import re
from pathlib import Path

from genloop.errors import UnsafePathError

# A segment starts with a letter or digit; then letters, digits, '.', '_', '-'.
# This excludes '', '.', '..', '/', '\\', '%', NUL, ':' and whitespace.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_segment(segment: str, what: str = "name") -> str:
    """Return ``segment`` if it is one safe path component, else raise naming it."""
    if not _SEGMENT.fullmatch(segment) or segment.endswith("."):
        raise UnsafePathError(
            f"invalid {what} {segment!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (at most 128 characters)"
        )
    return segment


def split_key(key: str, what: str = "artifact key") -> list[str]:
    """Split a ``a/b/c`` key into checked segments."""
    if not isinstance(key, str) or not key:
        raise UnsafePathError(f"invalid {what}: empty")
    parts = key.split("/")
    for part in parts:
        check_segment(part, what=f"{what} segment in {key!r}")
    return parts


def safe_join(root: Path, key: str, what: str = "artifact key") -> Path:
    """``root / key`` for a checked ``a/b/c`` key, guaranteed to resolve under ``root``."""
    parts = split_key(key, what)
    root_resolved = root.resolve()
    candidate = root_resolved.joinpath(*parts)
    return ensure_within(root_resolved, candidate, what=f"{what} {key!r}")


def ensure_within(root: Path, path: Path, what: str = "path") -> Path:
    """Resolve ``path`` (following symlinks) and refuse it unless it lies under ``root``."""
    root_resolved = root.resolve()
    resolved = path.resolve()
    if resolved != root_resolved and not resolved.is_relative_to(root_resolved):
        raise UnsafePathError(f"{what} resolves outside {root_resolved}")
    return resolved
