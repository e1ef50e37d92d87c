"""A dataset version's records, a page at a time, and its images as PNG thumbnails.

What the Data view shows, for each way a version stores its records:

    docs/<split>.jsonl              text and code (``genloop data prepare``): {"id", "text", …}
    pairs/<split>.jsonl             row kinds (sft, dpo, classification, …: ``data/pairs.py``)
    images/<split>/images.safetensors (+ captions.json, classes.json)   image datasets
    tokens/<split>*.bin             token shards only: the text was not kept

Paging a JSON Lines split reads lines up to ``offset + limit`` (never the rest of the file);
a record's long strings are cut at :data:`MAX_FIELD` characters with ``truncated`` set, so
one page stays small whatever the data. Files are found from the catalog's artifact key and
a split name checked against the ones present, never from a path in a request, and the
files of an image split are read only after their digests match the artifact's manifest
(checked once per file version). Text splits are read as they are, unverified: hashing a
multi-gigabyte split to show twenty lines would cost more than the page is worth.
"""

from __future__ import annotations

import io
import json
from itertools import islice
from pathlib import Path
from typing import Any

from genloop.errors import GenloopError, IntegrityError, NotFoundError
from genloop.workspace.datasets import DatasetVersionInfo
from genloop.workspace.manifest import file_sha256, read_manifest
from genloop.workspace.workspace import Workspace

MAX_FIELD = 4000  # characters of one string field sent per record
MAX_OFFSET = 1_000_000  # records skipped at most (a page further in is refused)
THUMBNAIL = 256  # longest side of a thumbnail, pixels
STORAGES = ("docs", "pairs")
_VERIFIED: dict[tuple[str, int, int], bool] = {}  # (file, mtime_ns, size) whose digest matched


def _clip(value: Any) -> tuple[Any, bool]:
    """``value`` with strings cut at MAX_FIELD characters (recursively); whether any was cut."""
    if isinstance(value, str):
        return (value[:MAX_FIELD], True) if len(value) > MAX_FIELD else (value, False)
    if isinstance(value, list):
        pairs = [_clip(v) for v in value[:200]]
        return [v for v, _ in pairs], len(value) > 200 or any(c for _, c in pairs)
    if isinstance(value, dict):
        out, cut = {}, False
        for k, v in islice(value.items(), 50):
            out[k], c = _clip(v)
            cut = cut or c
        return out, cut or len(value) > 50
    return value, False


def layout(root: Path) -> dict[str, Any]:
    """How a version's artifact stores records: ``{"storage", "splits"}``.

    ``storage`` is ``docs``, ``pairs``, ``images``, ``tokens`` or ``none``.
    """
    for storage in STORAGES:
        splits = sorted(p.stem for p in (root / storage).glob("*.jsonl"))
        if splits:
            return {"storage": storage, "splits": splits}
    images = sorted(p.parent.name for p in (root / "images").glob("*/images.safetensors"))
    if images:
        return {"storage": "images", "splits": images}
    tokens = sorted(p.stem for p in (root / "tokens").glob("*.json"))
    if tokens:
        return {"storage": "tokens", "splits": tokens}
    return {"storage": "none", "splits": []}


def _split(found: dict[str, Any], split: str | None, ref: str) -> str:
    if not found["splits"]:
        raise NotFoundError(f"dataset {ref} stores no records")
    if split is None:
        return "train" if "train" in found["splits"] else str(found["splits"][0])
    if split not in found["splits"]:
        raise NotFoundError(f"dataset {ref} has no split {split!r} (splits: {found['splits']})")
    return split


def read_records(
    ws: Workspace, info: DatasetVersionInfo, split: str | None, offset: int, limit: int
) -> dict[str, Any]:
    """One page of a split's records: ``{storage, splits, split, offset, limit, data,
    has_more, total}`` (``total`` where it is known without reading the whole split)."""
    if offset > MAX_OFFSET:
        raise GenloopError(f"offset {offset} is past {MAX_OFFSET}; narrow the dataset instead")
    root = ws.store.path(info.artifact)
    found = layout(root)
    page: dict[str, Any] = {**found, "offset": offset, "limit": limit, "data": []}
    if found["storage"] in ("none", "tokens"):
        page |= {"split": None, "has_more": False, "total": 0}
        return page
    chosen = _split(found, split, info.ref)
    page["split"] = chosen
    splits = info.stats.get("splits")
    known = splits.get(chosen) if isinstance(splits, dict) else None
    if found["storage"] == "images":
        count, captions, classes, labels = _image_page(root, chosen, offset, limit, info.ref)
        page["data"] = [
            {
                "index": i,
                "caption": (captions[i][:MAX_FIELD] if captions else None),
                "label": classes[lab] if 0 <= lab < len(classes) else None,
            }
            for i, lab in zip(range(offset, min(count, offset + limit)), labels, strict=True)
        ]
        page |= {"total": count, "has_more": offset + limit < count}
        return page
    path = root / found["storage"] / f"{chosen}.jsonl"
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", errors="replace") as f:  # bad bytes: shown as U+FFFD
        lines = (line for line in f if line.strip())
        for n, line in enumerate(islice(lines, offset, offset + limit + 1)):
            if n == limit:
                page["has_more"] = True
                break
            try:
                record, cut = _clip(json.loads(line))
            except json.JSONDecodeError:
                record, cut = _clip(line)
            rows.append({"index": offset + n, "record": record, "truncated": cut})
    page["data"] = rows
    page.setdefault("has_more", False)
    docs = known.get("documents") if isinstance(known, dict) else None
    page["total"] = docs if isinstance(docs, int) else None
    return page


def _image_page(
    root: Path, split: str, offset: int, limit: int, ref: str
) -> tuple[int, list[str] | None, list[Any], list[int]]:
    """(image count, captions, class names, labels of the page) of an image split, read
    from files whose digests match the manifest."""
    from safetensors import SafetensorError, safe_open

    rel = f"images/{split}"
    try:
        tensors = _verified(root, f"{rel}/images.safetensors")
        classes = json.loads(_verified(root, f"{rel}/classes.json").read_text("utf-8"))
        captions = None
        if (root / rel / "captions.json").is_file():
            captions = json.loads(_verified(root, f"{rel}/captions.json").read_text("utf-8"))
        with safe_open(str(tensors), framework="np") as f:
            count = int(f.get_slice("images").get_shape()[0])
            labels = [int(x) for x in f.get_slice("labels")[offset : min(count, offset + limit)]]
    except (OSError, ValueError, SafetensorError) as e:
        raise IntegrityError(f"{ref}: unreadable image split {split} ({e})") from e
    if not isinstance(classes, list) or (captions is not None and not isinstance(captions, list)):
        raise IntegrityError(f"{ref}: not a genloop image dataset (classes or captions)")
    return count, [str(c) for c in captions] if captions else None, classes, labels


def _verified(root: Path, rel: str) -> Path:
    """``root/rel`` after its SHA-256 matches the manifest's line for it (cached per
    file version: the check reads the file once, not on every thumbnail)."""
    path = root / rel
    expected = read_manifest(root).get(rel)
    if expected is None or not path.is_file():
        raise IntegrityError(f"{rel} is not listed in the artifact's manifest")
    st = path.stat()
    stamp = (str(path), st.st_mtime_ns, st.st_size)
    if not _VERIFIED.get(stamp):
        if file_sha256(path) != expected:
            raise IntegrityError(f"{rel}: its digest does not match the manifest")
        if len(_VERIFIED) > 1024:
            _VERIFIED.clear()
        _VERIFIED[stamp] = True
    return path


def image_png(ws: Workspace, info: DatasetVersionInfo, split: str, index: int) -> bytes:
    """Image ``index`` of a split as PNG bytes, at most THUMBNAIL pixels on a side."""
    import numpy as np
    from PIL import Image
    from safetensors import SafetensorError, safe_open

    root = ws.store.path(info.artifact)
    found = layout(root)
    if found["storage"] != "images":
        raise NotFoundError(f"dataset {info.ref} holds no images")
    chosen = _split(found, split, info.ref)
    path = _verified(root, f"images/{chosen}/images.safetensors")
    try:
        with safe_open(str(path), framework="np") as f:
            images = f.get_slice("images")
            count = int(images.get_shape()[0])
            if index >= count:
                raise NotFoundError(f"dataset {info.ref} split {chosen} has {count} images")
            pixels = np.asarray(images[index : index + 1])[0]  # (C, H, W) uint8
    except (OSError, ValueError, SafetensorError) as e:
        raise IntegrityError(f"{info.ref}: unreadable image split {chosen} ({e})") from e
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise IntegrityError(f"{info.ref}: not a genloop image dataset (unexpected tensors)")
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
