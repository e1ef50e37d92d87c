"""A Hugging Face dataset saved with ``save_to_disk``: one record per row of ``field``.

Rows are read in batches from the memory-mapped Arrow files, so memory stays flat. A
saved ``DatasetDict`` is read at ``split`` (default ``train``, or its only split); a saved
single ``Dataset``
has no splits, so ``split`` must be left out. Ids are ``SPLIT:ROW`` (or ``ROW`` for a
single dataset; 0-based). The fingerprint hashes the saved files' content.

With ``image_field`` (a column of the datasets ``Image`` feature, or of raw bytes) each
row is a captioned image: the encoded image bytes in ``data`` (undecoded: the image step
decodes and checks them) and ``field`` as its caption. A row without image bytes is
quarantined (``missing_image``); a null caption becomes empty (quarantined as
``empty_caption`` by the caption step).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genloop.data.records import Quarantined, Record
from genloop.data.sources import local
from genloop.errors import GenloopError

_BATCH = 1000


class HfDiskSource:
    kind = "hf_disk"

    def __init__(
        self,
        path: str | Path,
        *,
        split: str | None = None,
        field: str = "text",
        image_field: str | None = None,
        root: Path | None = None,
    ) -> None:
        self.path = str(path)
        self.field = field
        self.image_field = image_field
        self._base = local.resolve_user_path(path, root, "hf_disk source: path")
        self._split = split
        # Load now to fail with the reason here rather than in the middle of a run; this
        # also settles the split: the one read from a DatasetDict, None for a Dataset.
        self.split: str | None = None
        self._load()

    def _load(self) -> Any:
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(self._base))
        except (FileNotFoundError, ValueError) as e:
            raise GenloopError(
                f"hf_disk source: {self.path!r} is not a dataset saved with save_to_disk ({e})"
            ) from e
        if isinstance(ds, DatasetDict):
            self.split = self._split or (
                "train" if "train" in ds or len(ds) != 1 else next(iter(ds))
            )
            if self.split not in ds:
                raise GenloopError(
                    f"hf_disk source: {self.path!r} has no split {self.split!r}; "
                    f"it has {sorted(ds)}"
                )
            ds = ds[self.split]
        elif self._split is not None:
            raise GenloopError(
                f"hf_disk source: {self.path!r} is a single Dataset with no splits; "
                "leave 'split' out"
            )
        for column in (self.field, self.image_field):
            if column is not None and column not in ds.column_names:
                raise GenloopError(
                    f"hf_disk source: {self.path!r} has no column {column!r}; "
                    f"it has {ds.column_names}"
                )
        if self.image_field is not None:
            from datasets import Image, Value

            feature = ds.features[self.image_field]
            if isinstance(feature, Image):
                ds = ds.cast_column(self.image_field, Image(decode=False))  # bytes, not PIL
            elif not (isinstance(feature, Value) and feature.dtype in ("binary", "large_binary")):
                raise GenloopError(
                    f"hf_disk source: column {self.image_field!r} of {self.path!r} holds "
                    f"{feature}, not images (an Image feature or binary)"
                )
        return ds

    def records(self) -> Iterator[Record | Quarantined]:
        if self.image_field is not None:
            yield from self._images(self.image_field)
            return
        ds = self._load().select_columns([self.field])
        meta = {"split": self.split, "field": self.field}
        prefix = f"{self.split}:" if self.split is not None else ""
        row = 0
        for batch in ds.iter(batch_size=_BATCH):
            for value in batch[self.field]:
                item_id = f"{prefix}{row}"
                row += 1
                if isinstance(value, str):
                    yield Record(item_id, self.kind, text=value, meta=meta)
                else:
                    detail = f"row {row - 1}: {self.field!r} is {type(value).__name__}, not str"
                    yield Quarantined(item_id, self.kind, "bad_field", detail)

    def _images(self, image_field: str) -> Iterator[Record | Quarantined]:
        ds = self._load().select_columns([image_field, self.field])
        meta = {"split": self.split, "field": self.field, "image_field": image_field}
        prefix = f"{self.split}:" if self.split is not None else ""
        row = 0
        for batch in ds.iter(batch_size=_BATCH):
            for image, text in zip(batch[image_field], batch[self.field], strict=True):
                item_id = f"{prefix}{row}"
                row += 1
                data = image.get("bytes") if isinstance(image, dict) else image
                if not isinstance(data, bytes) or not data:
                    where = image.get("path") if isinstance(image, dict) else None
                    detail = f"row {row - 1}: no image bytes" + (
                        f" (path {where!r})" if where else ""
                    )
                    yield Quarantined(item_id, self.kind, "missing_image", detail)
                    continue
                if text is None:
                    text = ""
                if not isinstance(text, str):
                    detail = f"row {row - 1}: {self.field!r} is {type(text).__name__}, not str"
                    yield Quarantined(item_id, self.kind, "bad_field", detail)
                    continue
                yield Record(item_id, self.kind, text=text, data=data, meta=meta)

    def fingerprint(self) -> str:
        header: dict[str, Any] = {"kind": self.kind, "split": self.split, "field": self.field}
        if self.image_field is not None:
            header["image_field"] = self.image_field
        return local.fingerprint(header, local.walk(self._base))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "split": self.split,
            "field": self.field,
            **({"image_field": self.image_field} if self.image_field else {}),
            "rows": len(self._load()),
            "files": sum(1 for _ in local.walk(self._base)),
        }
