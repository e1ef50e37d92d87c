"""An image folder: one record per image file (``extensions``, default ``.png``, ``.jpg``,
``.jpeg``), raw bytes in ``data``.

The label is the top-level sub-folder name (``cats/1.png`` and ``cats/old/2.png`` → ``"cats"``);
images directly in the folder have no label. Nothing is decoded here: the image step
decodes and quarantines corrupt files. Hidden files and folders are skipped.

Captions follow Hugging Face datasets' imagefolder convention: a ``metadata.jsonl`` in any
folder holds one JSON object per line with ``file_name`` (the image, relative to that
folder) and the caption in ``text_column`` (default ``text``); the caption goes to
``Record.text`` and the line's other fields to ``meta``. Once a folder tree has metadata,
every image needs a line, and these go to quarantine with a reason instead of stopping the
run: a malformed line (``bad_json``), a line without ``file_name`` or the caption column
(``missing_column``), a caption that is not a string (``bad_field``), a line naming an
image that does not exist (``missing_image``) or lies outside the folder
(``outside_base``), an image no line names (``missing_caption``). Empty captions are
quarantined by the caption step (``empty_caption``), unreadable images by the image step
(``corrupt_image``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genloop.data.records import Quarantined, Record
from genloop.data.sources import local
from genloop.data.sources.local import LocalFile
from genloop.errors import GenloopError

SUFFIXES = (".png", ".jpg", ".jpeg")
METADATA = "metadata.jsonl"


@dataclass(frozen=True, slots=True)
class _Caption:
    image: str  # the image's path relative to the base (posix)
    text: str
    meta: dict[str, Any]


class ImagesSource:
    kind = "images"

    def __init__(
        self,
        path: str | Path,
        *,
        extensions: Sequence[str] = SUFFIXES,
        text_column: str = "text",
        root: Path | None = None,
    ) -> None:
        self.path = str(path)
        # '.png' and 'png' both name the same extension.
        self.extensions = sorted({"." + e.lower().lstrip(".") for e in extensions})
        if not self.extensions:
            raise GenloopError("images source: 'extensions' is empty")
        if not text_column or text_column == "file_name":
            raise GenloopError(f"images source: text_column {text_column!r} cannot hold captions")
        self.text_column = text_column
        self._base = local.resolve_user_path(path, root, "images source: path")
        if not self._base.is_dir():
            raise GenloopError(f"images source: path {self.path!r} is not a folder")

    def _walk(self) -> Iterator[LocalFile]:
        return local.walk(self._base, keep_dir=lambda name: not name.startswith("."))

    def _files(self) -> Iterator[LocalFile]:
        for f in self._walk():
            name = f.rel.rsplit("/", 1)[-1]
            if not name.startswith(".") and Path(name).suffix.lower() in self.extensions:
                yield f

    def _metadata_files(self) -> list[LocalFile]:
        return [f for f in self._walk() if f.rel.rsplit("/", 1)[-1] == METADATA]

    def records(self) -> Iterator[Record | Quarantined]:
        metadata = self._metadata_files()
        if not metadata:
            for f in self._files():
                data = yield from self._read(f)
                if data is not None:
                    meta = {"path": f.rel}
                    yield Record(f.rel, self.kind, data=data, label=_label(f.rel), meta=meta)
            return
        images = {f.rel: f for f in self._files()}
        captioned: set[str] = set()
        for m in metadata:
            for item in self._captions(m):
                if isinstance(item, Quarantined):
                    yield item
                    continue
                found = images.get(item.image)
                if found is None:
                    missing = _missing(self._base, item.image)
                    yield Quarantined(item.meta["metadata"], self.kind, "missing_image", missing)
                    continue
                repeat = item.image in captioned  # a second caption of one image
                captioned.add(item.image)
                data = yield from self._read(found)
                if data is not None:
                    rid = f"{item.image}#{item.meta['line']}" if repeat else item.image
                    meta = {"path": found.rel, **item.meta}
                    label = _label(found.rel)
                    yield Record(rid, self.kind, text=item.text, data=data, label=label, meta=meta)
        for rel in sorted(images.keys() - captioned):
            detail = f"no line of a {METADATA} names this image"
            yield Quarantined(rel, self.kind, "missing_caption", detail)

    def _read(self, f: LocalFile) -> Generator[Quarantined, None, bytes | None]:
        """Yield a Quarantined for an unreadable file; return its bytes (None if unread)."""
        if f.path is None:
            yield Quarantined(
                f.rel, self.kind, "outside_base", "a symbolic link that leads outside"
            )
            return None
        try:
            return f.path.read_bytes()
        except OSError as e:
            yield Quarantined(f.rel, self.kind, "unreadable", str(e))
            return None

    def _captions(self, m: LocalFile) -> Iterator[_Caption | Quarantined]:
        """The lines of one metadata file, each a caption or a reason it is not one."""
        folder = posixpath.dirname(m.rel)
        if m.path is None:
            yield Quarantined(
                m.rel, self.kind, "outside_base", "a symbolic link that leads outside"
            )
            return
        try:
            lines = m.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            yield Quarantined(m.rel, self.kind, "unreadable", str(e))
            return
        for n, line in enumerate(lines, 1):
            lid = f"{m.rel}:{n}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield Quarantined(lid, self.kind, "bad_json", f"line {n}: {e}")
                continue
            if not isinstance(row, dict):
                detail = f"line {n}: a JSON {type(row).__name__}, not an object"
                yield Quarantined(lid, self.kind, "bad_json", detail)
                continue
            absent = [c for c in ("file_name", self.text_column) if c not in row]
            if absent:
                detail = f"line {n}: no {' or '.join(map(repr, absent))}; it has {sorted(row)}"
                yield Quarantined(lid, self.kind, "missing_column", detail)
                continue
            name, text = row["file_name"], row[self.text_column]
            if not isinstance(name, str) or not name:
                detail = f"line {n}: file_name is {name!r}, not a path"
                yield Quarantined(lid, self.kind, "missing_column", detail)
                continue
            if text is None:
                text = ""  # an empty caption: the caption step quarantines it
            if not isinstance(text, str):
                detail = f"line {n}: {self.text_column!r} is {type(text).__name__}, not str"
                yield Quarantined(lid, self.kind, "bad_field", detail)
                continue
            image = posixpath.normpath(posixpath.join(folder, name))
            if image.startswith("../") or image == ".." or posixpath.isabs(name):
                detail = f"line {n}: {name!r} leads outside the folder"
                yield Quarantined(lid, self.kind, "outside_base", detail)
                continue
            meta = {k: v for k, v in row.items() if k not in ("file_name", self.text_column)}
            meta |= {"metadata": lid, "line": n}
            yield _Caption(image, text, meta)

    def fingerprint(self) -> str:
        header = {"kind": self.kind, "extensions": self.extensions, "text": self.text_column}
        files = sorted([*self._files(), *self._metadata_files()], key=lambda f: f.rel)
        return local.fingerprint(header, files)

    def describe(self) -> dict[str, Any]:
        labels = {_label(f.rel) for f in self._files()}
        metadata = [f.rel for f in self._metadata_files()]
        out: dict[str, Any] = {
            "kind": self.kind,
            "path": self.path,
            "extensions": self.extensions,
            "files": sum(1 for _ in self._files()),
            "labels": sorted(label for label in labels if label is not None),
        }
        if metadata:
            out |= {"metadata": metadata, "text_column": self.text_column}
        return out


def _label(rel: str) -> str | None:
    folder, sep, _ = rel.partition("/")
    return folder if sep else None


def _missing(base: Path, rel: str) -> str:
    if (base / rel).exists():
        return f"{rel} is not an image file of the chosen extensions"
    return f"{rel} does not exist"
