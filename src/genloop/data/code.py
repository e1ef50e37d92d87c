"""Source-code steps: drop what does not parse, strip license headers, format with ruff.

A record's language comes from ``meta["language"]`` (set by the code source from the file
extension: ``python``, ``javascript``, ``c`` …); without one, a ``meta["path"]`` ending in
``.py``/``.pyi`` means Python. The steps follow the per-record step contract of
:mod:`genloop.data.clean` (picklable, ``name``, ``__call__(record) -> Record | Dropped``).
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tempfile
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genloop.data.records import Dropped, Record
from genloop.errors import GenloopError


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
_RUFF_TIMEOUT_S = 600  # one chunk of files; ruff formats megabytes a second


class FormatCode:
    """Format Python with ruff's formatter (Black's style), keeping only what it cannot break.

    A Python file is formatted when ruff formats it and the result parses to the same
    syntax tree (``ast.dump`` of before and after equal); otherwise it is dropped:
    ``unformattable`` (ruff reports an error, e.g. a syntax error; quarantined with ruff's
    message) or ``format_changed_ast`` (the formatted file would be another program; a guard
    against a formatter bug). Docstrings compare as Black's safety check compares them, each
    line's surrounding whitespace aside: ruff re-indents them, and a strict comparison
    dropped a third of the standard library for it. Other languages
    get trailing whitespace stripped, as editors do; Markdown and plain text are left
    alone. A file keeps its end: one final newline if it had any, none if it had none
    (``Normalize`` strips it by default; the end-of-document token ends each file).

    ruff runs once per chunk of records (:meth:`batch`, which ``steps.process_chunk``
    calls), on a temporary folder holding the chunk's Python files, in one thread: process
    start-up is paid once per chunk, not per file.
    """

    name = "format_code"

    def __call__(self, record: Record) -> Record | Dropped:
        return self.batch([record])[0]

    def batch(self, records: list[Record]) -> list[Record | Dropped]:
        """Each record formatted (the same object, text replaced when it changed) or dropped."""
        out: list[Record | Dropped] = list(records)
        python: list[int] = []
        for i, record in enumerate(records):
            language = record_language(record)
            if not record.text or language in _NO_FORMAT_LANGUAGES:
                continue
            if language == "python":
                python.append(i)
            else:
                text = _strip_trailing(record.text)
                if text != record.text:
                    record.text = text
        stubs = [str(records[i].meta.get("path", "")).endswith(".pyi") for i in python]
        formatted = ruff_format([records[i].text or "" for i in python], stubs=stubs)
        for i, result in zip(python, formatted, strict=True):
            out[i] = _check_formatted(records[i], result)
        return out


@dataclass(frozen=True, slots=True)
class FormatError:
    """ruff could not format a file: its message (line:column: what)."""

    message: str


def ruff_format(texts: list[str], *, stubs: list[bool] | None = None) -> list[str | FormatError]:
    """Each Python source formatted by ``ruff format`` (default settings, no configuration
    files read), or the error ruff gave for it. ``stubs[i]`` formats text ``i`` as a ``.pyi``
    stub. One ruff process for all of them, in one thread (worker processes are already one
    per core)."""
    if not texts:
        return []
    stubs = stubs or [False] * len(texts)
    out: list[str | FormatError] = list(texts)
    with tempfile.TemporaryDirectory(prefix="genloop-ruff-") as tmp:
        paths: dict[int, Path] = {}
        for i, (text, stub) in enumerate(zip(texts, stubs, strict=True)):
            path = Path(tmp) / f"{i}.pyi" if stub else Path(tmp) / f"{i}.py"
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as exc:  # lone surrogates
                out[i] = FormatError(f"not valid Unicode text ({exc.reason})")
                continue
            path.write_bytes(data)
            paths[i] = path
        if not paths:
            return out
        env = {**os.environ, "RAYON_NUM_THREADS": "1", "NO_COLOR": "1"}
        cmd = [ruff_binary(), "format", "--isolated", "--no-cache"]
        try:
            proc = subprocess.run(
                [*cmd, *map(str, paths.values())],
                capture_output=True,
                env=env,
                timeout=_RUFF_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise GenloopError(
                f"ruff format took over {_RUFF_TIMEOUT_S} s on {len(paths)} files; "
                "turn data.code.format off or split the corpus"
            ) from exc
        # ruff may print the folder relative to the working directory: match its name
        errors = _ruff_errors(proc.stderr.decode("utf-8", "replace"), Path(tmp).name)
        if proc.returncode != 0 and not errors:
            message = proc.stderr.decode("utf-8", "replace").strip()[:500]
            raise GenloopError(f"ruff format failed (exit {proc.returncode}): {message}")
        for i, path in paths.items():
            out[i] = FormatError(errors[i]) if i in errors else path.read_bytes().decode("utf-8")
    return out


def _ruff_errors(stderr: str, folder: str) -> dict[int, str]:
    """File index → ruff's message (``line:column: what``), from its
    ``error: Failed to parse …/FOLDER/3.py:1:7: …`` lines."""
    errors: dict[int, str] = {}
    for line in stderr.splitlines():
        if not line.startswith("error:") or folder not in line:
            continue
        name = line.split(folder, 1)[1].lstrip("/\\")
        index, _, rest = name.partition(".")
        if index.isdigit():
            message = rest.split(":", 1)[1] if ":" in rest else rest
            errors[int(index)] = message.strip(" :")[:500] or "ruff could not format it"
    return errors


def ruff_binary() -> str:
    """The ruff executable: the ``ruff`` package's own (``find_ruff_bin``), else one next to
    this Python interpreter."""
    try:
        from ruff.__main__ import find_ruff_bin

        return str(find_ruff_bin())
    except (ImportError, FileNotFoundError):
        pass
    name = "ruff.exe" if sys.platform == "win32" else "ruff"
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise GenloopError(
        "data.code.format needs ruff, which is not installed in this environment: "
        "pip install ruff (a genloop dependency), or set data.code.format to false"
    )


def _check_formatted(record: Record, result: str | FormatError) -> Record | Dropped:
    """The record with ruff's formatting, if the syntax tree is unchanged; else dropped."""
    if isinstance(result, FormatError):
        return Dropped("unformattable", result.message, quarantine=True)
    text = record.text or ""
    if not text.endswith("\n"):  # normalize strips the final newline: keep it off
        result = result.removesuffix("\n")
    if result == text:
        return record
    try:
        same = same_program(text, result)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        # ruff's parser took it, CPython's does not (newer syntax): it cannot be checked
        detail = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
        return Dropped("unformattable", f"Python cannot parse it to check: {detail}", True)
    if not same:
        return Dropped("format_changed_ast", "formatting changes the syntax tree")
    record.text = result
    return record


def _strip_trailing(text: str) -> str:
    """Trailing whitespace off every line; one final newline if the text ended with one."""
    if " \n" in text or "\t\n" in text or "\r" in text or "\f" in text or "\v" in text:
        text = "\n".join([line.rstrip() for line in text.split("\n")])
    stripped = text.rstrip()
    return stripped + "\n" if stripped and text.endswith("\n") else stripped or text


def same_program(before: str, after: str) -> bool:
    """Whether two Python sources parse to the same syntax tree, docstrings compared as
    Black's safety check compares them (:func:`_dump`); raises SyntaxError when one does not
    parse."""
    return bool(_dump(before) == _dump(after))


def _dump(text: str) -> Any:
    """The syntax tree of ``text`` as a string, docstrings compared as Black compares them
    (each line stripped, then the whole): a formatter re-indents docstrings, which changes
    the string but not what it documents."""
    tree = _parse(text)
    for node in ast.walk(tree):
        if not isinstance(node, _DOCUMENTED) or not node.body:
            continue
        first = node.body[0]
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            lines = first.value.value.splitlines()
            first.value.value = "\n".join(line.strip() for line in lines).strip()
    return ast.dump(tree)


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
