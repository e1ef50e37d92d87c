"""Local text files and globs: ``.txt``/``.md``, ``.jsonl``/``.json``, ``.csv``/``.parquet``.

``paths`` entries are files, folders (every supported file under them) or globs
(``data/**/*.jsonl``; ``**`` spans folders). Paths in ids and meta are relative to the
entry's base: the folder itself, a file's parent, or a glob's part before its first
wildcard. When expanding folders and globs, hidden files and folders are skipped and
unsupported suffixes ignored; a file named explicitly must have a supported suffix.

Text is decoded with ``encoding`` (default UTF-8, with or without a byte-order mark).
Ids: ``rel`` for one-record files and a JSON object, ``rel:LINE`` (1-based, as an editor
shows it) for JSONL lines and CSV rows, ``rel:INDEX`` (0-based) for JSON list items and
parquet rows. Unreadable input yields :class:`Quarantined` and the rest goes on.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from genloop.data.records import Quarantined, Record
from genloop.data.sources import local
from genloop.data.sources.local import LocalFile
from genloop.errors import GenloopError

SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet")
_PARQUET_BATCH = 1024  # rows per batch: memory stays flat on large files

Item = Record | Quarantined


class FilesSource:
    kind = "files"

    def __init__(
        self,
        paths: str | Sequence[str],
        *,
        field: str = "text",
        columns: str | Sequence[str] = ("text",),
        encoding: str = "utf-8",
        root: Path | None = None,
    ) -> None:
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        if not self.paths:
            raise GenloopError("files source: 'paths' is empty")
        self.field = field
        self.columns = [columns] if isinstance(columns, str) else list(columns)
        if not self.columns:
            raise GenloopError("files source: 'columns' is empty")
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise GenloopError(f"files source: unknown encoding {encoding!r}") from None
        self.encoding = encoding
        # A UTF-8 byte-order mark is not text: 'utf-8-sig' reads files with or without one.
        self._codec = "utf-8-sig" if codec == "utf-8" else codec
        self._entries = [self._entry(p, root) for p in self.paths]

    @staticmethod
    def _entry(pattern: str, root: Path | None) -> tuple[Path, str | None]:
        """(base, glob relative to it, or None for a file or a whole folder)."""
        base, glob = local.split_glob(pattern)
        base = local.resolve_user_path(base, root, "files source: path")
        if glob is None and base.is_file() and base.suffix.lower() not in SUFFIXES:
            raise GenloopError(
                f"files source: {pattern!r} has an unsupported suffix; "
                f"supported: {', '.join(SUFFIXES)}"
            )
        if not base.is_file() and not any(_found(base, glob)):
            raise GenloopError(f"files source: {pattern!r} matches no supported file")
        return base, glob

    def _files(self) -> Iterator[LocalFile]:
        for base, glob in self._entries:
            if base.is_file():
                yield LocalFile(base.name, base.resolve())
            else:
                yield from _found(base, glob)

    def records(self) -> Iterator[Item]:
        readers = {
            ".txt": self._text,
            ".md": self._text,
            ".jsonl": self._jsonl,
            ".json": self._json,
            ".csv": self._csv,
            ".parquet": self._parquet,
        }
        for f in self._files():
            if f.path is None:
                yield self._bad(f.rel, "outside_base", "a symbolic link that leads outside")
                continue
            try:
                yield from readers[Path(f.rel).suffix.lower()](f.rel, f.path)
            except OSError as e:
                yield self._bad(f.rel, "unreadable", str(e))

    def fingerprint(self) -> str:
        header = {"kind": self.kind, "field": self.field, "columns": self.columns}
        header["encoding"] = self._codec
        return local.fingerprint(header, self._files())

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "paths": self.paths,
            "field": self.field,
            "columns": self.columns,
            "encoding": self.encoding,
            "files": sum(1 for _ in self._files()),
        }

    # -- one reader per format -------------------------------------------------------

    def _text(self, rel: str, path: Path) -> Iterator[Item]:
        try:
            text = path.read_bytes().decode(self._codec)
        except UnicodeDecodeError as e:
            yield self._bad(rel, "undecodable", self._undecodable(e))
            return
        yield Record(rel, self.kind, text=text, meta={"path": rel})

    def _jsonl(self, rel: str, path: Path) -> Iterator[Item]:
        with path.open("rb") as fh:  # line by line: a file larger than memory is fine
            for n, raw in enumerate(fh, start=1):
                item_id = f"{rel}:{n}"
                try:
                    line = raw.decode(self._codec).strip()
                except UnicodeDecodeError as e:
                    yield self._bad(item_id, "undecodable", f"line {n}: {self._undecodable(e)}")
                    continue
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield self._bad(item_id, "bad_json", f"line {n}: {e.msg} at column {e.colno}")
                    continue
                yield self._from_object(item_id, obj, rel, f"line {n}")

    def _json(self, rel: str, path: Path) -> Iterator[Item]:
        # A .json file is parsed whole; JSONL is the format for corpora larger than memory.
        try:
            data = json.loads(path.read_bytes().decode(self._codec))
        except UnicodeDecodeError as e:
            yield self._bad(rel, "undecodable", self._undecodable(e))
            return
        except json.JSONDecodeError as e:
            yield self._bad(rel, "bad_json", f"{e.msg} at line {e.lineno} column {e.colno}")
            return
        if isinstance(data, list):
            for i, obj in enumerate(data):
                yield self._from_object(f"{rel}:{i}", obj, rel, f"item {i}")
        else:
            yield self._from_object(rel, data, rel, "the document")

    def _from_object(self, item_id: str, obj: object, rel: str, where: str) -> Item:
        if not isinstance(obj, dict):
            return self._bad(item_id, "bad_json", f"{where} is not a JSON object")
        if self.field not in obj:
            return self._bad(item_id, "missing_field", f"{where} has no field {self.field!r}")
        text = obj[self.field]
        if not isinstance(text, str):
            kind = type(text).__name__
            return self._bad(item_id, "bad_field", f"{where}: {self.field!r} is {kind}, not str")
        return Record(item_id, self.kind, text=text, meta={"path": rel, "field": self.field})

    def _csv(self, rel: str, path: Path) -> Iterator[Item]:
        meta = {"path": rel, "columns": self.columns}
        with path.open(encoding=self._codec, newline="") as fh:
            reader = csv.DictReader(fh)
            try:
                header = reader.fieldnames or []
                missing = [c for c in self.columns if c not in header]
                if missing:
                    detail = f"no column {missing} (the header has {header})"
                    yield self._bad(rel, "missing_field", detail)
                    return
                line = reader.line_num + 1  # where the next row starts
                for row in reader:
                    values = [row.get(c) for c in self.columns]
                    if any(v is None for v in values):
                        detail = f"line {line}: the row is shorter than the header"
                        yield self._bad(f"{rel}:{line}", "missing_field", detail)
                    else:
                        text = "\n".join(v for v in values if v is not None)
                        yield Record(f"{rel}:{line}", self.kind, text=text, meta=meta)
                    line = reader.line_num + 1
            except UnicodeDecodeError as e:
                detail = f"after line {reader.line_num}: {self._undecodable(e)}"
                yield self._bad(rel, "undecodable", detail)
            except csv.Error as e:
                yield self._bad(rel, "bad_csv", f"line {reader.line_num}: {e}")

    def _parquet(self, rel: str, path: Path) -> Iterator[Item]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = {"path": rel, "columns": self.columns}
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            missing = [c for c in self.columns if c not in names]
            if missing:
                yield self._bad(rel, "missing_field", f"no column {missing} (it has {names})")
                return
            row = 0
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=self.columns):
                for values in zip(
                    *(batch.column(c).to_pylist() for c in self.columns), strict=True
                ):
                    item_id = f"{rel}:{row}"
                    row += 1
                    if not all(isinstance(v, str) for v in values):
                        detail = f"row {row - 1}: a selected column is null or not a string"
                        yield self._bad(item_id, "bad_field", detail)
                        continue
                    yield Record(item_id, self.kind, text="\n".join(values), meta=meta)
        except pa.ArrowException as e:
            yield self._bad(rel, "unreadable", f"not a readable parquet file: {e}")

    def _undecodable(self, e: UnicodeDecodeError) -> str:
        return f"not {self.encoding}: {e.reason} at byte {e.start}"

    def _bad(self, item_id: str, reason: str, detail: str) -> Quarantined:
        return Quarantined(item_id, self.kind, reason, detail)


def _found(base: Path, glob: str | None) -> Iterator[LocalFile]:
    """Supported, non-hidden files under ``base`` (matching ``glob`` when given)."""
    match = local.glob_matcher(glob) if glob is not None else None
    for f in local.walk(base, keep_dir=lambda name: not name.startswith(".")):
        name = f.rel.rsplit("/", 1)[-1]
        if name.startswith(".") or Path(name).suffix.lower() not in SUFFIXES:
            continue
        if match is None or match(f.rel):
            yield f
