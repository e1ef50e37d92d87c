"""Finding local files under a base folder without leaving it, and hashing what was found.

Every source that reads a folder (files, code, images, the stdlib corpus, a saved Hugging
Face dataset) walks it here, so they share one order (sorted, top-down), one rule for
symbolic links (folders are not entered; a file link that resolves outside the base is
reported, never read) and one fingerprint recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genloop.errors import GenloopError, UnsafePathError
from genloop.workspace.paths import ensure_within

_WILDCARDS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file found under ``base``: ``rel`` (posix, relative to the base) names it in
    record ids and meta; ``path`` is the resolved file, or None when it is a symbolic link
    that leads outside the base."""

    rel: str
    path: Path | None


def walk(base: Path, keep_dir: Callable[[str], bool] | None = None) -> Iterator[LocalFile]:
    """Every file under ``base``, sorted, top-down. ``keep_dir(name)`` prunes sub-folders;
    symbolic links to folders are never entered (so no loops and no escapes)."""
    root = base.resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
        dirnames[:] = sorted(d for d in dirnames if keep_dir is None or keep_dir(d))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                yield LocalFile(rel, ensure_within(root, path))
            except UnsafePathError:
                yield LocalFile(rel, None)


def split_glob(pattern: str) -> tuple[Path, str | None]:
    """``data/**/*.txt`` → (``data``, ``**/*.txt``); a pattern with no wildcard → (it, None).

    The base is the longest leading run of parts with no wildcard: paths in records are
    relative to it.
    """
    parts = Path(pattern).parts
    for i, part in enumerate(parts):
        if _WILDCARDS & set(part):
            return (Path(*parts[:i]) if i else Path(".")), "/".join(parts[i:])
    return Path(pattern), None


def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """Match a posix relative path against a glob: ``**`` spans folders (zero or more),
    ``*`` and ``?`` stay within one, ``[abc]``/``[!abc]`` are character classes."""
    segments = pattern.strip("/").split("/")
    regex = ""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _segment_regex(segment) + ("" if last else "/")
    compiled = re.compile(regex)
    return lambda rel: compiled.fullmatch(rel) is not None


def _segment_regex(segment: str) -> str:
    out, i = [], 0
    while i < len(segment):
        char = segment[i]
        close = segment.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif close != -1:
            body = segment[i + 1 : close]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = close
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def resolve_user_path(path: str | Path, root: Path | None, what: str) -> Path:
    """A path from the user (absolute, or relative to ``root`` or the working folder) that
    must exist."""
    candidate = Path(path).expanduser()
    if root is not None and not candidate.is_absolute():
        candidate = root / candidate
    if not candidate.exists():
        raise GenloopError(f"{what} {str(path)!r} does not exist")
    return candidate


def fingerprint(header: dict[str, Any], files: Iterable[LocalFile]) -> str:
    """sha256 over the source's settings and, per file in order, its relative path and the
    sha256 of its content (streamed). Absolute locations are left out, so a moved folder
    keeps its fingerprint."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for f in files:
        if f.path is None:
            digest = "outside-base"
        else:
            try:
                with f.path.open("rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
            except OSError as e:
                digest = f"unreadable:{e.errno}"
        h.update(f"\n{f.rel}\0{digest}".encode())
    return h.hexdigest()
