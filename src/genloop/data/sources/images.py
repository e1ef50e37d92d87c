"""An image folder: one record per image file (``extensions``, default ``.png``, ``.jpg``,
``.jpeg``), raw bytes in ``data``.

The label is the top-level sub-folder name (``cats/1.png`` and ``cats/old/2.png`` → ``"cats"``);
images directly in the folder have no label. Nothing is decoded here: the image step
decodes and quarantines corrupt files. Hidden files and folders are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from genloop.data.records import Quarantined, Record
from genloop.data.sources import local
from genloop.data.sources.local import LocalFile
from genloop.errors import GenloopError

SUFFIXES = (".png", ".jpg", ".jpeg")


class ImagesSource:
    kind = "images"

    def __init__(
        self, path: str | Path, *, extensions: Sequence[str] = SUFFIXES, root: Path | None = None
    ) -> None:
        self.path = str(path)
        # '.png' and 'png' both name the same extension.
        self.extensions = sorted({"." + e.lower().lstrip(".") for e in extensions})
        if not self.extensions:
            raise GenloopError("images source: 'extensions' is empty")
        self._base = local.resolve_user_path(path, root, "images source: path")
        if not self._base.is_dir():
            raise GenloopError(f"images source: path {self.path!r} is not a folder")

    def _files(self) -> Iterator[LocalFile]:
        for f in local.walk(self._base, keep_dir=lambda name: not name.startswith(".")):
            name = f.rel.rsplit("/", 1)[-1]
            if not name.startswith(".") and Path(name).suffix.lower() in self.extensions:
                yield f

    def records(self) -> Iterator[Record | Quarantined]:
        for f in self._files():
            if f.path is None:
                detail = "a symbolic link that leads outside"
                yield Quarantined(f.rel, self.kind, "outside_base", detail)
                continue
            try:
                data = f.path.read_bytes()
            except OSError as e:
                yield Quarantined(f.rel, self.kind, "unreadable", str(e))
                continue
            yield Record(f.rel, self.kind, data=data, label=_label(f.rel), meta={"path": f.rel})

    def fingerprint(self) -> str:
        return local.fingerprint({"kind": self.kind, "extensions": self.extensions}, self._files())

    def describe(self) -> dict[str, Any]:
        labels = {_label(f.rel) for f in self._files()}
        return {
            "kind": self.kind,
            "path": self.path,
            "extensions": self.extensions,
            "files": sum(1 for _ in self._files()),
            "labels": sorted(label for label in labels if label is not None),
        }


def _label(rel: str) -> str | None:
    folder, sep, _ = rel.partition("/")
    return folder if sep else None
