"""The image step, image dataset files, and training-time augmentation."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genloop.data.images import (
    DecodeImage,
    augment,
    class_names,
    load_image_dataset,
    normalize,
    to_uint8,
    write_image_dataset,
)
from genloop.data.records import Dropped, Record
from genloop.errors import GenloopError, IntegrityError


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(w * h)
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def record(data: bytes | None, label: int | str | None = None, rid: str = "r") -> Record:
    return Record(rid, "images", data=data, label=label, meta={"path": f"{rid}.png"})


def test_decodes_resizes_and_converts() -> None:
    step = DecodeImage(size=16, channels=1)
    out = step(record(encode(gradient(40, 30)), label="cat"))
    assert isinstance(out, Record)
    with Image.open(io.BytesIO(out.data or b"")) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (16, 16)
    assert out.meta["width"] == out.meta["height"] == 16 and out.meta["mode"] == "L"
    assert out.meta["source_size"] == [40, 30] and out.meta["path"] == "r.png"
    assert out.label == "cat"
    # Enlarging, RGB from a JPEG, and keeping the size with size=None.
    rgb = DecodeImage(size=32, channels=3)(record(encode(gradient(8, 8), "JPEG")))
    assert isinstance(rgb, Record) and rgb.meta["mode"] == "RGB" and rgb.meta["width"] == 32
    same = DecodeImage(size=None, channels=3)(record(encode(gradient(7, 5))))
    assert isinstance(same, Record) and (same.meta["width"], same.meta["height"]) == (7, 5)


def test_transparent_pixels_become_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = DecodeImage(size=None, channels=1)(record(encode(clear)))
    assert isinstance(out, Record)
    with Image.open(io.BytesIO(out.data or b"")) as im:
        assert np.asarray(im).min() == 255


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,  # a PNG signature and garbage
    ],
)
def test_corrupt_bytes_are_quarantined(data: bytes) -> None:
    out = DecodeImage(size=8, channels=1)(record(data))
    assert isinstance(out, Dropped)
    assert out.reason == "corrupt_image" and out.quarantine and out.detail


def test_truncated_and_tampered_pngs_are_quarantined() -> None:
    good = encode(gradient(64, 64))
    step = DecodeImage(size=8, channels=3)
    for bad in (good[: len(good) // 2], good[:-20], good[:60] + bytes(200) + good[260:]):
        out = step(record(bad))
        assert isinstance(out, Dropped) and out.reason == "corrupt_image", out
    assert isinstance(step(record(good)), Record)


def test_oversized_images_are_refused_before_decoding() -> None:
    out = DecodeImage(size=8, channels=1, max_pixels=100)(record(encode(gradient(20, 20))))
    assert isinstance(out, Dropped) and out.reason == "image_too_large" and out.quarantine


def test_the_step_pickles() -> None:
    step = pickle.loads(pickle.dumps(DecodeImage(size=8, channels=3)))
    assert step.name == "decode_image" and step.size == 8 and step.channels == 3


def decoded(n: int, size: int = 8, channels: int = 1) -> list[Record]:
    step = DecodeImage(size=size, channels=1 if channels == 1 else 3)
    out = []
    for i in range(n):
        rec = step(record(encode(gradient(10 + i, 12)), label=i % 3, rid=f"img{i}"))
        assert isinstance(rec, Record)
        out.append(rec)
    return out


def test_dataset_round_trip(tmp_path: Path) -> None:
    recs = decoded(7, channels=3)
    write_image_dataset(recs, tmp_path)
    images, labels, classes = load_image_dataset(tmp_path)
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 8, 8)
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 3 for i in range(7)]
    assert classes == ["0", "1", "2"]
    for rec, img in zip(recs, images, strict=True):
        with Image.open(io.BytesIO(rec.data or b"")) as im:
            assert np.array_equal(np.asarray(im).transpose(2, 0, 1), img.numpy())


def test_string_labels_and_a_fixed_class_list(tmp_path: Path) -> None:
    recs = decoded(3)
    for rec, label in zip(recs, ["dog", "cat", None], strict=True):
        rec.label = label
    write_image_dataset(recs, tmp_path / "a")
    _, labels, classes = load_image_dataset(tmp_path / "a")
    assert classes == ["cat", "dog"] and labels.tolist() == [1, 0, -1]
    write_image_dataset(recs, tmp_path / "b", classes=["dog", "cat", "bird"])
    _, labels, classes = load_image_dataset(tmp_path / "b")
    assert classes == ["dog", "cat", "bird"] and labels.tolist() == [0, 1, -1]
    with pytest.raises(GenloopError, match="not in classes"):
        write_image_dataset(recs, tmp_path / "c", classes=["dog"])


def test_mixed_sizes_and_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GenloopError, match="one size"):
        write_image_dataset(decoded(2, size=8) + decoded(1, size=9), tmp_path / "mixed")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "images.safetensors").write_bytes(b"garbage")
    with pytest.raises(IntegrityError):
        load_image_dataset(tmp_path / "bad")


def test_normalize_range_and_inverse() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = normalize(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), pixels)


def test_augment_is_deterministic_and_changes_images() -> None:
    images = normalize(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8))
    a = augment(images, torch.Generator().manual_seed(0))
    b = augment(images, torch.Generator().manual_seed(0))
    c = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, images)
    assert a.shape == images.shape and a.min() >= -1 and a.max() <= 1
    # Each part alone, and all off = identity.
    g = torch.Generator().manual_seed(0)
    flipped = augment(images, g, flip=True, crop_pad=0, jitter=0)
    for orig, out in zip(images, flipped, strict=True):
        assert torch.equal(out, orig) or torch.equal(out, orig.flip(-1))
    assert not torch.equal(flipped, images)
    cropped = augment(images, g, flip=False, crop_pad=2, jitter=0)
    assert not torch.equal(cropped, images)
    assert torch.equal(augment(images, g, flip=False, crop_pad=0, jitter=0), images)
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), g)


def test_integer_labels_are_their_own_class_ids() -> None:
    assert class_names([2, 0, None]) == ["0", "1", "2"]
    assert class_names(["b", "a", "b"]) == ["a", "b"]
