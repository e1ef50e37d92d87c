"""A source-code folder: one record per file, language from the extension.

Hidden folders, ``__pycache__`` and ``node_modules`` are not entered. ``extensions`` and
``languages`` narrow the files taken (default: every extension in :data:`LANGUAGES`; an
extension not in the table is taken as its own language name); ``exclude`` globs
work like ``.gitignore`` lines: a pattern without ``/`` matches a file or folder name at
any depth (``*.min.js``, ``vendor``), one with ``/`` matches from the base
(``src/gen/**``). Files over ``max_bytes`` are quarantined as ``too_large`` unread.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from genloop.data.records import Quarantined, Record
from genloop.data.sources import local
from genloop.data.sources.local import LocalFile
from genloop.errors import GenloopError

LANGUAGES = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".go": "go",
    ".rs": "rust",
    ".java": "java",
    ".kt": "kotlin",
    ".scala": "scala",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".hh": "cpp",
    ".hpp": "cpp",
    ".hxx": "cpp",
    ".cs": "csharp",
    ".swift": "swift",
    ".rb": "ruby",
    ".php": "php",
    ".lua": "lua",
    ".r": "r",
    ".jl": "julia",
    ".sh": "shell",
    ".bash": "shell",
    ".zsh": "shell",
    ".sql": "sql",
}
SKIP_DIRS = frozenset({"__pycache__", "node_modules"})  # and every hidden folder (.git, .venv)
MAX_BYTES = 1_000_000


class CodeSource:
    kind = "code"

    def __init__(
        self,
        path: str | Path,
        *,
        extensions: Sequence[str] | None = None,
        languages: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        max_bytes: int = MAX_BYTES,
        root: Path | None = None,
    ) -> None:
        self.path = str(path)
        self._base = local.resolve_user_path(path, root, "code source: path")
        if not self._base.is_dir():
            raise GenloopError(f"code source: path {self.path!r} is not a folder")
        # '.py' and 'py' both name the same extension.
        self.extensions = sorted(
            {"." + e.lower().lstrip(".") for e in extensions} if extensions else LANGUAGES
        )
        self.languages = sorted(set(languages)) if languages else None
        unknown = sorted(set(self.languages or ()) - set(LANGUAGES.values()))
        if unknown:
            raise GenloopError(
                f"code source: unknown language {unknown}; "
                f"known: {', '.join(sorted(set(LANGUAGES.values())))}"
            )
        self.exclude = list(exclude)
        self._excludes = [(("/" in p), local.glob_matcher(p)) for p in self.exclude]
        if max_bytes <= 0:
            raise GenloopError(f"code source: max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes

    def _excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        for anchored, match in self._excludes:
            if anchored:  # the path or one of its folders, from the base
                if any(match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
                    return True
            elif any(match(part) for part in parts):
                return True
        return False

    def _files(self) -> Iterator[LocalFile]:
        def keep_dir(name: str) -> bool:
            return not name.startswith(".") and name not in SKIP_DIRS

        for f in local.walk(self._base, keep_dir):
            ext = Path(f.rel).suffix.lower()
            if ext not in self.extensions or self._excluded(f.rel):
                continue
            if self.languages is None or LANGUAGES.get(ext) in self.languages:
                yield f

    def records(self) -> Iterator[Record | Quarantined]:
        for f in self._files():
            ext = Path(f.rel).suffix.lower()
            language = LANGUAGES.get(ext, ext[1:])
            if f.path is None:
                yield self._bad(f.rel, "outside_base", "a symbolic link that leads outside")
                continue
            try:
                size = f.path.stat().st_size
                if size > self.max_bytes:
                    detail = f"{size} bytes, over the {self.max_bytes}-byte limit"
                    yield self._bad(f.rel, "too_large", detail)
                    continue
                text = f.path.read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError as e:
                yield self._bad(f.rel, "undecodable", f"not UTF-8: {e.reason} at byte {e.start}")
                continue
            except OSError as e:
                yield self._bad(f.rel, "unreadable", str(e))
                continue
            yield Record(f.rel, self.kind, text=text, meta={"path": f.rel, "language": language})

    def fingerprint(self) -> str:
        header = {
            "kind": self.kind,
            "extensions": self.extensions,
            "languages": self.languages,
            "exclude": self.exclude,
            "max_bytes": self.max_bytes,
        }
        return local.fingerprint(header, self._files())

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "extensions": self.extensions,
            "languages": self.languages,
            "exclude": self.exclude,
            "max_bytes": self.max_bytes,
            "files": sum(1 for _ in self._files()),
        }

    def _bad(self, item_id: str, reason: str, detail: str) -> Quarantined:
        return Quarantined(item_id, self.kind, reason, detail)
