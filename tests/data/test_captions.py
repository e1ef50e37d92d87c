"""Captioned image data: the ``shapes`` builtin corpus, caption cleaning, ``captions.json``
beside each image split, and the caption tokenizer a prepared dataset version carries."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from genloop.config import DataConfig, TokenizerConfig
from genloop.data.images import (
    CAPTIONS_FILE,
    CleanCaption,
    caption_split,
    load_captions,
    write_image_dataset,
)
from genloop.data.prepare import prepare_dataset
from genloop.data.records import Dropped, Record
from genloop.data.shapes import RGB, Scene, ShapeObject, parse_caption, render, slot_bounds
from genloop.data.sources import build_source
from genloop.data.tokenizer import load_tokenizer
from genloop.errors import GenloopError, IntegrityError
from genloop.workspace import Workspace
from genloop.workspace.datasets import resolve_dataset

from ..conftest import run_genloop


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def assert_image_shows(image: np.ndarray, scene: Scene) -> None:
    """Every slot the caption names holds ink of the named colour; the others are blank."""
    size = image.shape[0]
    named = {o.position: o for o in scene.objects}
    for position in ("left", "center", "right"):
        lo, hi = slot_bounds(position, size)
        pixels = image[:, lo:hi].reshape(-1, 3)
        ink = pixels[(pixels != 255).any(axis=1)]
        if position not in named:
            assert len(ink) == 0, position
            continue
        assert len(ink) > 0, position
        colours = {tuple(int(v) for v in p) for p in ink}
        assert colours == {RGB[named[position].colour]}, (position, colours)


# ------------------------------------------------------------------------ shapes source


def test_shapes_source_yields_captioned_pngs_of_seen_scenes() -> None:
    source = build_source({"type": "builtin", "name": "shapes", "count": 300, "size": 32})
    records = list(source.records())
    assert len(records) == 300
    for rec in records:
        assert isinstance(rec, Record) and rec.label is None and rec.data is not None
        assert rec.source == "builtin:shapes" and rec.text is not None
        scene = parse_caption(rec.text)
        assert scene is not None and not scene.held_out()
        assert scene.to_dicts() == rec.meta["objects"]
        image = decode(rec.data)
        assert image.shape == (32, 32, 3)
        assert_image_shows(image, scene)
    # the fingerprint follows the options
    same = build_source({"type": "builtin", "name": "shapes", "count": 300, "size": 32})
    other = build_source({"type": "builtin", "name": "shapes", "count": 300, "seed": 1})
    assert source.fingerprint() == same.fingerprint() != other.fingerprint()
    assert source.describe() == {
        "kind": "builtin:shapes",
        "name": "shapes",
        "count": 300,
        "size": 32,
        "seed": 0,
    }


def test_shapes_options_are_checked() -> None:
    with pytest.raises(GenloopError, match="'count' is for 'shapes' only"):
        build_source({"type": "builtin", "name": "digits", "count": 5})
    with pytest.raises(GenloopError, match="size must be 12 to 1024"):
        build_source({"type": "builtin", "name": "shapes", "size": 4})
    with pytest.raises(GenloopError, match="count must be at least 1"):
        build_source({"type": "builtin", "name": "shapes", "count": 0})


# ---------------------------------------------------------------- captions on disk


def test_clean_caption_normalizes_like_short_text_and_quarantines_empty_ones() -> None:
    step = CleanCaption()
    out = step(Record("a", "images", text="  Cafe\u0301 au lait\n on a\ttable  ", data=b"x"))
    assert isinstance(out, Record) and out.text == "Caf\u00e9 au lait on a table"
    short = step(Record("b", "images", text="a cat", data=b"x"))
    assert isinstance(short, Record) and short.text == "a cat"  # no document length filter
    for empty in ("", " \n\t "):
        dropped = step(Record("c", "images", text=empty, data=b"x"))
        assert isinstance(dropped, Dropped)
        assert dropped.reason == "empty_caption" and dropped.quarantine
    bare = Record("d", "images", data=b"x")
    assert step(bare) is bare  # an uncaptioned image passes
    lower = CleanCaption(lowercase=True)(Record("e", "images", text="A Red Circle"))
    assert isinstance(lower, Record) and lower.text == "a red circle"


def test_captions_json_is_aligned_and_checked(tmp_path: Path) -> None:
    scenes = [
        Scene((ShapeObject("red", "circle", "large", "left"),)),
        Scene((ShapeObject("blue", "square", "small", "right"),)),
    ]
    records = [
        Record(str(i), "t", text=f"caption {i}", data=png(render(s))) for i, s in enumerate(scenes)
    ]
    out = tmp_path / "images" / "train"
    write_image_dataset(records, out)
    assert load_captions(out) == ["caption 0", "caption 1"]
    found = caption_split(tmp_path, "train")
    assert found is not None
    images, captions = found
    assert images.shape == (2, 3, 32, 32) and captions == ["caption 0", "caption 1"]
    assert caption_split(tmp_path, "val") is None
    # an uncaptioned split has no captions.json
    write_image_dataset([Record("x", "t", data=png(render(scenes[0])))], tmp_path / "plain")
    assert not (tmp_path / "plain" / CAPTIONS_FILE).exists()
    assert load_captions(tmp_path / "plain") is None
    # tampering is an IntegrityError, not a silent misalignment
    (out / CAPTIONS_FILE).write_text(json.dumps(["only one"]))
    with pytest.raises(IntegrityError, match="1 captions for 2 images"):
        load_captions(out)
    (out / CAPTIONS_FILE).write_text(json.dumps(["a", 2]))
    with pytest.raises(IntegrityError, match="not a list of strings"):
        caption_split(tmp_path, "train")


# --------------------------------------------------------------- prepare, as a user runs it

SHAPES_CONFIG = """\
data:
  name: shapes
  kind: images
  sources:
    - {type: builtin, name: shapes, count: 600, size: 32, seed: 3}
  images: {size: 32, channels: 3}
  split: {val: 0.1, test: 0.1}
tokenizer:
  vocab_size: 320
"""


def test_data_prepare_writes_aligned_captions_and_a_caption_tokenizer(
    workspace: Workspace, tmp_path: Path
) -> None:
    config = tmp_path / "shapes.yaml"
    config.write_text(SHAPES_CONFIG)
    result = run_genloop(workspace, "data", "prepare", config, "--workers", "1", "--json")
    assert result.returncode == 0, result.output
    info = resolve_dataset(workspace, "shapes")
    stats = info.stats
    # exact duplicates (same pixels, same caption) are dropped, nothing else
    assert set(stats["drops"]) <= {"duplicate"}
    assert stats["documents"] + stats["dedup"]["exact"] == 600
    path = workspace.store.open_verified(info.artifact)
    total = 0
    for split, v in stats["splits"].items():
        found = caption_split(path, split)
        assert found is not None
        images, captions = found
        assert images.shape == (v["documents"], 3, 32, 32) and len(captions) == len(images)
        for image, text in zip(images, captions, strict=True):
            scene = parse_caption(text)
            assert scene is not None and not scene.held_out()
            assert_image_shows(image.permute(1, 2, 0).numpy(), scene)
        total += len(images)
    assert total == stats["documents"]
    train = load_captions(path / "images" / "train")
    assert train is not None
    tok = stats["tokenizer"]
    assert tok["captions"] == len(train) and tok["vocab_size"] <= 320
    tokenizer = load_tokenizer(path / "tokenizer")
    assert tokenizer.get_vocab_size() == tok["vocab_size"]
    ids = tokenizer.encode(train[0]).ids
    assert tokenizer.decode(ids) == train[0]
    # the corpus' words became whole tokens: captions are short in tokens
    assert tok["max_caption_tokens"] <= 40
    # the same config again: nothing redone
    again = run_genloop(workspace, "data", "prepare", config, "--workers", "1", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["created"] is False


# ------------------------------------------------------- captioned folders and datasets


def shape_png(colour: str, shape: str, position: str = "center", size: str = "large") -> bytes:
    return png(render(Scene((ShapeObject(colour, shape, size, position),))))


def prepare_images(ws: Workspace, sources: list[dict[str, object]]) -> tuple[Path, dict[str, Any]]:
    cfg = DataConfig.model_validate(
        {
            "name": "captioned",
            "kind": "images",
            "sources": sources,
            "images": {"size": 32, "channels": 3},
            "split": {"val": 0, "test": 0},
        }
    )
    info, _ = prepare_dataset(ws, cfg, TokenizerConfig(vocab_size=300), workers=1)
    return ws.store.open_verified(info.artifact), info.stats


def quarantined(path: Path) -> list[tuple[str, str]]:
    lines = (path / "quarantine.jsonl").read_text().splitlines()
    return sorted((q["id"], q["reason"]) for q in map(json.loads, lines))


def test_image_folder_with_metadata_jsonl(workspace: Workspace, tmp_path: Path) -> None:
    pics = tmp_path / "pics"
    (pics / "more").mkdir(parents=True)
    (pics / "red.png").write_bytes(shape_png("red", "circle"))
    (pics / "blue.png").write_bytes(shape_png("blue", "square", "left"))
    (pics / "green.png").write_bytes(shape_png("green", "triangle", "right"))
    (pics / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (pics / "silent.png").write_bytes(shape_png("yellow", "circle"))  # named by no line
    (pics / "more" / "big.png").write_bytes(shape_png("orange", "square", "right"))
    lines = [
        json.dumps({"file_name": "red.png", "text": "  a large red\ncircle  in the center"}),
        json.dumps({"file_name": "blue.png", "text": "a large blue square on the left"}),
        json.dumps({"file_name": "blue.png", "text": "a large blue square on the left"}),
        json.dumps({"file_name": "blue.png", "text": "a blue square, left", "source": "web"}),
        json.dumps({"file_name": "green.png", "text": "  "}),
        json.dumps({"file_name": "broken.png", "text": "a broken picture"}),
        json.dumps({"file_name": "gone.png", "text": "a picture that is not there"}),
        json.dumps({"file_name": "red.png", "caption": "the wrong column"}),
        json.dumps({"file_name": "../outside.png", "text": "far away"}),
        json.dumps({"file_name": "red.png", "text": 7}),
        '{"file_name": "red.png", "text": ',
        "",
    ]
    (pics / "metadata.jsonl").write_text("\n".join(lines))
    more = {"file_name": "big.png", "text": "a large orange square on the right"}
    (pics / "more" / "metadata.jsonl").write_text(json.dumps(more) + "\n")

    path, stats = prepare_images(workspace, [{"type": "images", "path": str(pics)}])
    assert quarantined(path) == [
        ("broken.png", "corrupt_image"),
        ("green.png", "empty_caption"),
        ("metadata.jsonl:10", "bad_field"),
        ("metadata.jsonl:11", "bad_json"),
        ("metadata.jsonl:7", "missing_image"),
        ("metadata.jsonl:8", "missing_column"),
        ("metadata.jsonl:9", "outside_base"),
        ("silent.png", "missing_caption"),
    ]
    assert stats["dedup"]["exact"] == 1  # blue.png with the same caption twice
    found = caption_split(path, "train")
    assert found is not None
    images, captions = found
    assert sorted(captions) == [
        "a blue square, left",  # the same image with another caption is kept
        "a large blue square on the left",
        "a large orange square on the right",
        "a large red circle in the center",  # whitespace collapsed
    ]
    for image, text in zip(images, captions, strict=True):
        scene = parse_caption(text) or parse_caption("a large blue square on the left")
        assert scene is not None
        assert_image_shows(image.permute(1, 2, 0).numpy(), scene)
    assert (path / "tokenizer" / "tokenizer.json").is_file()

    # a named caption column; every line lacks it → all quarantined, no captions left
    source = build_source({"type": "images", "path": str(pics), "text_column": "caption"})
    reasons = [i.reason for i in source.records() if not isinstance(i, Record)]
    assert reasons.count("missing_column") == 10
    assert [r.text for r in source.records() if isinstance(r, Record)] == ["the wrong column"]


def test_hf_disk_dataset_with_image_and_text_columns(workspace: Workspace, tmp_path: Path) -> None:
    from datasets import Dataset, Features, Image, Value

    rows = [
        ("red", "circle", "left", "a large red circle on the left"),
        ("blue", "triangle", "right", "a large blue triangle on the right"),
        ("blue", "triangle", "right", "a large blue triangle on the right"),  # duplicate
        ("green", "square", "center", None),  # no caption
        ("yellow", "square", "center", "a large yellow square in the center"),
    ]
    pictures = [
        pil_image(shape_png(colour, shape, position)) for colour, shape, position, _ in rows
    ]
    features = Features({"picture": Image(), "caption": Value("string")})
    Dataset.from_dict(
        {"picture": pictures, "caption": [r[3] for r in rows]}, features=features
    ).save_to_disk(tmp_path / "ds")
    spec = {"type": "hf_disk", "path": str(tmp_path / "ds"), "image_field": "picture"}
    spec["field"] = "caption"
    path, stats = prepare_images(workspace, [spec])
    assert quarantined(path) == [("3", "empty_caption")]
    assert stats["dedup"]["exact"] == 1
    found = caption_split(path, "train")
    assert found is not None
    images, captions = found
    assert sorted(captions) == sorted({r[3] for r in rows if r[3]})
    for image, text in zip(images, captions, strict=True):
        scene = parse_caption(text)
        assert scene is not None
        assert_image_shows(image.permute(1, 2, 0).numpy(), scene)

    with pytest.raises(GenloopError, match="no column 'image'"):
        build_source(spec | {"image_field": "image"})
    with pytest.raises(GenloopError, match=r"holds .*not images"):
        build_source(spec | {"image_field": "caption"})


def pil_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
