"""Source-code steps: drop what does not parse, strip license headers, tidy formatting.

A record's language comes from ``meta["language"]`` (set by the code source from the file
extension: ``python``, ``javascript``, ``c`` …); without one, a ``meta["path"]`` ending in
``.py``/``.pyi`` means Python. The steps follow the per-record step contract of
:mod:`genloop.data.clean` (picklable, ``name``, ``__call__(record) -> Record | Dropped``).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import warnings
from typing import Any

from genloop.data.records import Dropped, Record


def record_language(record: Record) -> str | None:
    """The record's language, lowercased (``None`` when unknown)."""
    language = record.meta.get("language")
    if isinstance(language, str) and language:
        return language.lower()
    path = record.meta.get("path")
    if isinstance(path, str) and path.endswith((".py", ".pyi")):
        return "python"
    return None


def _parse(text: str, filename: str = "<record>") -> ast.Module:
    with warnings.catch_warnings():  # invalid escapes etc. warn; a data run should not
        warnings.simplefilter("ignore")
        tree = compile(text, filename, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
    assert isinstance(tree, ast.Module)
    return tree


class RequireParse:
    """Drop Python records that do not parse (reason ``unparseable``, quarantined with the
    error and its line). Records in other languages pass through unchanged.

    Parsing is CPython's own parser, so it costs what it costs (~3 MB/s per core on the
    standard library); it is meant for code datasets, where a broken file is worse than a
    slower run.
    """

    name = "require_parse"

    def __init__(self, language: str = "python") -> None:
        if language != "python":
            raise ValueError(f"RequireParse supports language 'python' only, not {language!r}")
        self.language = language

    def __call__(self, record: Record) -> Record | Dropped:
        if record.text is None or record_language(record) != self.language:
            return record
        try:
            _parse(record.text, str(record.meta.get("path", record.id)))
        except SyntaxError as exc:  # also IndentationError, TabError
            return Dropped("unparseable", f"{exc.msg} (line {exc.lineno})", quarantine=True)
        except (ValueError, RecursionError, MemoryError) as exc:  # NUL bytes, deep nesting
            detail = str(exc) or type(exc).__name__
            return Dropped("unparseable", detail, quarantine=True)
        return record


# --------------------------------------------------------------------- license headers

_LICENSE_RE = re.compile(
    r"copyright|licen[cs]e|spdx-|all rights reserved|permission is hereby granted|"
    r"redistribut|without warranty|warranties|free software|\(c\)\s|©",
    re.IGNORECASE,
)
HASH_COMMENT_LANGUAGES = frozenset(
    {"python", "ruby", "r", "julia", "shell", "perl", "yaml", "toml", "elixir", "nim"}
    | {"powershell", "makefile", "dockerfile", "cmake", "crystal", "tcl"}
)
C_COMMENT_LANGUAGES = frozenset(
    {"javascript", "typescript", "go", "rust", "java", "kotlin", "scala", "c", "cpp"}
    | {"csharp", "swift", "php", "dart", "objective-c", "css", "scss", "less", "groovy"}
    | {"zig", "solidity", "protobuf", "sql"}
)
DASH_COMMENT_LANGUAGES = frozenset({"lua", "sql", "haskell", "ada", "elm"})
# Lines that must stay on top: a shebang, an encoding declaration (PEP 263), Ruby's magic.
_KEEP_ON_TOP_RE = re.compile(r"#!|[ \t\f]*#.*?(?:coding[:=]|frozen_string_literal:)")


class StripLicenseHeader:
    """Remove a license or copyright header at the top of a source file.

    Removed, from the top and only while they mention a license or copyright: paragraphs
    of line comments (``#`` for Python, Ruby, shell …; ``//`` for C-family languages;
    ``--`` for Lua and SQL) and ``/* … */`` blocks (C family); for Python also a module
    docstring whose first line is about the license. Shebang and encoding lines stay.
    When the language is unknown, the comment style is taken from the file's first line.
    """

    name = "strip_license"

    def __call__(self, record: Record) -> Record | Dropped:
        if not record.text:
            return record
        text = strip_license_header(record.text, record_language(record))
        if text != record.text:
            record.text = text
        return record


def strip_license_header(text: str, language: str | None = None) -> str:
    """``text`` without its leading license header (see :class:`StripLicenseHeader`)."""
    lines = text.splitlines(keepends=True)
    top = 0
    while top < min(len(lines), 2) and _KEEP_ON_TOP_RE.match(lines[top]):
        top += 1
    styles = _comment_styles(language, lines[top:])
    pos = top
    removed = False
    while True:
        end = _license_block_end(lines, pos, styles)
        if end is None:
            break
        pos, removed = end, True
    if language == "python" or (language is None and "#" in styles):
        end = _license_docstring_end(lines, pos)
        if end is not None:
            pos, removed = end, True
    if not removed:
        return text
    while pos < len(lines) and not lines[pos].strip():
        pos += 1
    return "".join(lines[:top] + lines[pos:])


def _comment_styles(language: str | None, lines: list[str]) -> tuple[str, ...]:
    if language is not None:
        styles: tuple[str, ...] = ()
        if language in HASH_COMMENT_LANGUAGES:
            styles += ("#",)
        if language in C_COMMENT_LANGUAGES:
            styles += ("//", "/*")
        if language in DASH_COMMENT_LANGUAGES:
            styles += ("--",)
        return styles
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("/*") or first.startswith("//"):
        return ("//", "/*")
    if first.startswith("--"):
        return ("--",)
    if first.startswith("#") and not first[1:2].isalpha():  # "# …", not "#include"
        return ("#",)
    return ()


def _license_block_end(lines: list[str], pos: int, styles: tuple[str, ...]) -> int | None:
    """End (a line index) of the license comment block starting at or after ``pos``."""
    while pos < len(lines) and not lines[pos].strip():
        pos += 1
    if pos == len(lines):
        return None
    first = lines[pos].lstrip()
    if "/*" in styles and first.startswith("/*"):
        end = pos
        while end < len(lines) and "*/" not in lines[end]:
            end += 1
        if end == len(lines) or lines[end].split("*/", 1)[1].strip():
            return None  # unterminated, or code after the comment on its last line
        block = "".join(lines[pos : end + 1])
        return end + 1 if _LICENSE_RE.search(block) else None
    for marker in styles:
        if marker != "/*" and first.startswith(marker):
            end = pos
            while end < len(lines) and lines[end].lstrip().startswith(marker):
                end += 1
            block = "".join(lines[pos:end])
            return end if _LICENSE_RE.search(block) else None
    return None


def _license_docstring_end(lines: list[str], pos: int) -> int | None:
    """End (a line index) of a module docstring at ``pos`` that starts as a license."""
    source = "".join(lines[pos:])
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        skip = (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING)
        first = next(t for t in tokens if t.type not in skip)
        after = next(tokens)
    except (tokenize.TokenError, SyntaxError, StopIteration):
        return None
    if first.type != tokenize.STRING or after.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
        return None
    try:
        value = ast.literal_eval(first.string)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, str):
        return None
    first_line = next((line for line in value.splitlines() if line.strip()), "")
    if not _LICENSE_RE.search(first_line):
        return None
    return pos + first.end[0]


# --------------------------------------------------------------------------- formatting

_NO_FORMAT_LANGUAGES = frozenset({"markdown", "text", "diff", "patch"})
_LEADING_TABS_RE = re.compile(r"^[ \t]*\t[ \t]*", re.MULTILINE)


class FormatCode:
    """Light, safe formatting: strip trailing whitespace, end with one newline and, for
    Python, turn tab indentation into ``tab_width`` spaces.

    Python changes are kept only when the result parses to the same AST as the original
    (``ast.dump`` equality); otherwise the step falls back to less (no trailing-whitespace
    stripping, which can change a string literal; then only the final newline) and never
    to a change that alters the program. Other languages get the trailing-whitespace and
    final-newline part, as editors do. Markdown and plain text are left alone.
    """

    name = "format_code"

    def __init__(self, tab_width: int = 4) -> None:
        if tab_width < 1:
            raise ValueError(f"tab_width must be at least 1, got {tab_width}")
        self.tab_width = tab_width

    def __call__(self, record: Record) -> Record | Dropped:
        text = record.text
        language = record_language(record)
        if not text or language in _NO_FORMAT_LANGUAGES:
            return record
        new = self._format_python(text) if language == "python" else _strip_trailing(text)
        if new != text:
            record.text = new
        return record

    def _format_python(self, text: str) -> str:
        with_newline = text if text.endswith("\n") else text + "\n"  # never changes the AST
        candidates = [_strip_trailing(self._expand_tabs(text)), self._expand_tabs(with_newline)]
        candidates = [c for c in dict.fromkeys(candidates) if c != with_newline]
        if not candidates:
            return with_newline
        try:
            original = _dump(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return text  # cannot be checked: leave it to RequireParse
        for candidate in candidates:
            try:
                if _dump(candidate) == original:
                    return candidate
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
        return with_newline

    def _expand_tabs(self, text: str) -> str:
        if "\t" not in text:
            return text
        width = self.tab_width
        return _LEADING_TABS_RE.sub(lambda m: m.group().expandtabs(width), text)


def _strip_trailing(text: str) -> str:
    """Trailing whitespace off every line, and exactly one newline at the end."""
    if " \n" in text or "\t\n" in text or "\r" in text or "\f" in text or "\v" in text:
        text = "\n".join([line.rstrip() for line in text.split("\n")])
    stripped = text.rstrip()
    return stripped + "\n" if stripped else text


def _dump(text: str) -> Any:
    return ast.dump(_parse(text))
