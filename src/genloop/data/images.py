"""The image step (decode, check, resize), image datasets on disk, and augmentation.

Preparation: :class:`DecodeImage` runs per record in the worker processes. It decodes the
raw file bytes with Pillow, refuses corrupt, truncated and oversized ("decompression bomb")
files with a reason, converts to grayscale or RGB, resizes, and stores the result as PNG
bytes. :class:`CleanCaption` normalizes a captioned image's text and quarantines empty
captions. :func:`write_image_dataset` then writes a split as one ``images.safetensors``
(``images``: uint8 N×C×H×W, ``labels``: int64 N), ``classes.json`` (label names, index =
class id) and, when the records carry captions, ``captions.json`` (N strings, aligned with
the images). Nothing is pickled.

A dataset version's artifact holds a folder per split, ``images/<split>/``:
:func:`image_split`, :func:`require_images` and :func:`caption_split` read them.

Training: :func:`normalize` maps uint8 pixels to [-1, 1]; :func:`augment` flips, crops
and jitters a normalized batch with randomness drawn only from the generator it is given.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from genloop.data.records import Dropped, Record
from genloop.errors import GenloopError, IntegrityError, NotFoundError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image as PILImage

IMAGES_FILE = "images.safetensors"
CLASSES_FILE = "classes.json"
CAPTIONS_FILE = "captions.json"
MAX_PIXELS = 64 * 1024 * 1024  # larger images are refused before they are decoded


class DecodeImage:
    """Decode ``record.data`` into a ``size``×``size`` PNG with 1 (L) or 3 (RGB) channels.

    Non-square images are center-cropped to a square first (no distortion); ``size=None``
    keeps the original size. Shrinking uses LANCZOS, enlarging BILINEAR (LANCZOS rings
    around sharp edges when it enlarges tiny images such as 8×8 digits). Transparent
    images are flattened onto white. EXIF orientation is applied.

    Drops (to quarantine): ``corrupt_image`` (unreadable, truncated, not an image, no
    bytes) and ``image_too_large`` (more than ``max_pixels`` pixels).
    """

    name = "decode_image"

    def __init__(
        self, size: int | None, channels: Literal[1, 3], max_pixels: int = MAX_PIXELS
    ) -> None:
        if size is not None and size < 1:
            raise ValueError(f"size must be positive, not {size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        self.size = size
        self.channels = channels
        self.max_pixels = max_pixels

    def __call__(self, record: Record) -> Record | Dropped:
        from PIL import Image, ImageOps

        if not record.data:
            return Dropped("corrupt_image", "the record has no image bytes", quarantine=True)
        try:
            with warnings.catch_warnings():
                # Pillow only warns between MAX_IMAGE_PIXELS and twice that: make it an error.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(record.data)) as probe:
                    width, height = probe.size
                    if width * height > self.max_pixels:
                        return _too_large(width, height, self.max_pixels)
                    probe.verify()  # structure and checksums, without decoding pixels
                with Image.open(io.BytesIO(record.data)) as im:  # verify() spends the image
                    source_format = im.format
                    im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays off)
                    image = ImageOps.exif_transpose(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return Dropped("image_too_large", str(e), quarantine=True)
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError … on bad data
            return Dropped("corrupt_image", f"{type(e).__name__}: {e}", quarantine=True)

        image = _convert(image, "L" if self.channels == 1 else "RGB")
        if self.size is not None and image.size != (self.size, self.size):
            shrinking = min(image.size) > self.size
            resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BILINEAR
            image = ImageOps.fit(image, (self.size, self.size), method=resample)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        meta = {
            **record.meta,
            "width": image.width,
            "height": image.height,
            "mode": image.mode,
            "source_format": source_format,
            "source_size": [width, height],
        }
        return replace(record, data=buf.getvalue(), meta=meta)


class CleanCaption:
    """Normalize an image's caption (``record.text``) like a short text.

    Unicode normalization (``form``), optional lowercasing, and every run of whitespace
    (newlines included) collapsed to one space: a caption is one line. No length or
    quality filter meant for documents applies; an empty caption (after cleaning) is
    quarantined as ``empty_caption``. Records without a caption pass unchanged.
    """

    name = "clean_caption"

    def __init__(self, form: Literal["NFC", "NFKC", "none"] = "NFC", lowercase: bool = False):
        from genloop.data.clean import Normalize

        self._normalize = Normalize(form=form, strip_whitespace=True, lowercase=lowercase)

    def __call__(self, record: Record) -> Record | Dropped:
        if record.text is None:
            return record
        normalized = self._normalize(record)
        assert isinstance(normalized, Record) and normalized.text is not None
        text = " ".join(normalized.text.split())
        if not text:
            return Dropped("empty_caption", "the caption is empty", quarantine=True)
        if text != normalized.text:
            normalized.text = text
        return normalized


def _too_large(width: int, height: int, limit: int) -> Dropped:
    return Dropped(
        "image_too_large",
        f"{width}×{height} = {width * height:,} pixels is over the limit of {limit:,}",
        quarantine=True,
    )


def _convert(image: PILImage, mode: str) -> PILImage:
    from PIL import Image

    if image.mode == mode:
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


# ---------------------------------------------------------------------- dataset files


def class_names(labels: Iterable[int | str | None]) -> list[str]:
    """The class list for these labels: integer labels are their own class ids (0..max),
    string labels are sorted. Compute it over all splits and pass it to
    :func:`write_image_dataset` for each, so a class missing from one split shifts nothing."""
    present = [x for x in labels if x is not None]
    if present and all(isinstance(x, int) and not isinstance(x, bool) for x in present):
        ints = [int(x) for x in present]
        if min(ints) < 0:
            raise GenloopError(f"negative integer label {min(ints)}; labels must be ≥ 0")
        return [str(i) for i in range(max(ints) + 1)]
    return sorted({str(x) for x in present})


def write_image_dataset(
    records: Iterable[Record], out_dir: Path, classes: Sequence[str] | None = None
) -> Path:
    """Write decoded records (PNG bytes of one size and mode) as one split.

    ``classes`` fixes the label names (index = class id); pass the same list for every
    split of a dataset when labels are strings, so ids agree across splits. By default
    integer labels are their own ids and string labels are sorted. Unlabelled records get
    label -1. When any record has a caption (``text``), ``captions.json`` holds one string
    per image, in order ("" for an image without one). Returns the path of
    ``images.safetensors``.
    """
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    arrays: list[np.ndarray] = []
    labels: list[int | str | None] = []
    captions: list[str | None] = []
    shape: tuple[int, ...] | None = None
    for rec in records:
        if rec.data is None:
            raise GenloopError(f"record {rec.id} has no image data; run DecodeImage first")
        with Image.open(io.BytesIO(rec.data)) as im:
            if im.mode not in ("L", "RGB"):
                raise GenloopError(
                    f"record {rec.id}: expected L or RGB pixels, got {im.mode}; run DecodeImage"
                )
            a = np.asarray(im)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            raise GenloopError(
                f"record {rec.id} is {a.shape} (C, H, W) but earlier images are {shape}; "
                "decode every image to one size and mode with DecodeImage(size=..., channels=...)"
            )
        arrays.append(a)
        labels.append(rec.label)
        captions.append(rec.text)

    names = list(classes) if classes is not None else class_names(labels)
    ids = {name: i for i, name in enumerate(names)}
    label_ids = []
    for rec_label in labels:
        if rec_label is None:
            label_ids.append(-1)
        elif str(rec_label) in ids:
            label_ids.append(ids[str(rec_label)])
        else:
            raise GenloopError(f"label {rec_label!r} is not in classes {names}")

    images = np.ascontiguousarray(np.stack(arrays)) if arrays else np.zeros((0, 1, 0, 0), np.uint8)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLASSES_FILE).write_text(json.dumps(names, ensure_ascii=False) + "\n", "utf-8")
    if any(c is not None for c in captions):
        texts = [c or "" for c in captions]
        (out_dir / CAPTIONS_FILE).write_text(json.dumps(texts, ensure_ascii=False) + "\n", "utf-8")
    path = out_dir / IMAGES_FILE
    save_file(
        {
            "images": torch.from_numpy(images),
            "labels": torch.tensor(label_ids, dtype=torch.int64),
        },
        str(path),
        metadata={"format": "genloop-images"},
    )
    return path


def load_image_dataset(directory: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 N×C×H×W, labels int64 N, class names)`` of a written split."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / IMAGES_FILE
    if not path.is_file():
        raise NotFoundError(f"{directory}: no image dataset ({IMAGES_FILE} is missing)")
    import torch

    try:
        tensors = load_file(str(path))
        classes = json.loads((directory / CLASSES_FILE).read_text("utf-8"))
    except (OSError, ValueError, SafetensorError) as e:  # no classes.json, bad header …
        raise IntegrityError(f"{directory}: unreadable image dataset ({e})") from e
    images, labels = tensors.get("images"), tensors.get("labels")

    if (
        images is None
        or labels is None
        or images.dtype != torch.uint8
        or images.ndim != 4
        or labels.dtype != torch.int64
        or labels.shape != (images.shape[0],)
        or not isinstance(classes, list)
        or (labels.numel() > 0 and int(labels.max()) >= len(classes))
    ):
        raise IntegrityError(f"{path}: not a genloop image dataset (unexpected tensors)")
    return images, labels, [str(c) for c in classes]


def image_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """(images uint8, labels, class names) of a split of an image dataset version whose
    artifact is ``data_dir``; None if it has no such split."""
    directory = data_dir / "images" / split
    if not (directory / IMAGES_FILE).is_file():
        return None
    return load_image_dataset(directory)


def load_captions(split_dir: Path) -> list[str] | None:
    """The captions of a written split (one per image, in order); None if it has none.

    Raises IntegrityError when ``captions.json`` is not a list of strings or its length
    differs from the number of images.
    """
    path = split_dir / CAPTIONS_FILE
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        captions = json.loads(path.read_text("utf-8"))
        with safe_open(str(split_dir / IMAGES_FILE), framework="pt") as f:
            count = f.get_slice("images").get_shape()[0]
    except (OSError, ValueError, SafetensorError) as e:
        raise IntegrityError(f"{split_dir}: unreadable captions ({e})") from e
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise IntegrityError(f"{path}: not a list of strings")
    if len(captions) != count:
        raise IntegrityError(f"{path}: {len(captions)} captions for {count} images")
    return captions


def caption_split(data_dir: Path, split: str) -> tuple[torch.Tensor, list[str]] | None:
    """(images uint8 N×C×H×W, N captions) of a split of an image dataset version whose
    artifact is ``data_dir``; None if it has no such split or the split has no captions."""
    directory = data_dir / "images" / split
    if not (directory / IMAGES_FILE).is_file():
        return None
    captions = load_captions(directory)
    if captions is None:
        return None
    images, _, _ = load_image_dataset(directory)
    return images, captions


def require_images(
    data_dir: Path, ref: str = "the dataset"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The training split of an image dataset version, or a clear error."""
    found = image_split(data_dir, "train")
    if found is None:
        raise GenloopError(
            f"{ref} has no images (images/train is missing): image models train on a dataset "
            "prepared with data.kind: images"
        )
    if found[0].shape[0] == 0:
        raise GenloopError(f"{ref} has no training images")
    return found


# ------------------------------------------------------------------------- training


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] → uint8 pixels (the inverse of :func:`normalize`)."""
    import torch

    return ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def augment(
    batch: torch.Tensor,
    generator: torch.Generator,
    flip: bool = True,
    crop_pad: int = 1,
    jitter: float = 0.1,
) -> torch.Tensor:
    """Random horizontal flip, crop after edge padding, brightness/contrast jitter.

    ``batch``: float (B, C, H, W) in [-1, 1]; returns a new batch of the same shape in
    [-1, 1]. Every random number comes from ``generator`` (on its own device), in a fixed
    order, so the same generator state gives the same result. Turn ``flip`` off where
    mirroring changes the meaning (digits, text).
    """
    import torch

    if not batch.is_floating_point() or batch.ndim != 4:
        raise ValueError(f"expected a float (B, C, H, W) batch, got {batch.dtype} {batch.shape}")
    b, _, h, w = batch.shape
    dev = generator.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=dev).to(batch.device)

    out = batch
    if flip:
        mirrored = rand(b) < 0.5
        out = torch.where(mirrored[:, None, None, None], out.flip(-1), out)
    if crop_pad > 0:
        p = crop_pad
        padded = torch.nn.functional.pad(out, (p, p, p, p), mode="replicate")
        dy = (rand(b) * (2 * p + 1)).long().clamp(max=2 * p)  # offsets in 0..2p
        dx = (rand(b) * (2 * p + 1)).long().clamp(max=2 * p)
        rows = (dy[:, None] + torch.arange(h, device=batch.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=batch.device))[:, None, None, :]
        batch_idx = torch.arange(b, device=batch.device)[:, None, None, None]
        chan_idx = torch.arange(out.shape[1], device=batch.device)[None, :, None, None]
        out = padded[batch_idx, chan_idx, rows, cols]  # (B, C, H, W)
    if jitter > 0:
        u = (out + 1) / 2  # jitter in [0, 1] like torchvision's ColorJitter
        brightness = 1 + (rand(b) * 2 - 1) * jitter
        contrast = 1 + (rand(b) * 2 - 1) * jitter
        u = u * brightness[:, None, None, None]
        mean = u.mean(dim=(1, 2, 3), keepdim=True)
        u = (u - mean) * contrast[:, None, None, None] + mean
        out = u.clamp(0, 1) * 2 - 1
    return out
