"""The shapes judge: trained once (on one thread) and cached in a workspace; it reads fresh
corpus images of seen and held-out combinations, never credits noise, and scores captions
attribute by attribute."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from genloop.data.shapes import Scene, ShapeObject, caption, render
from genloop.errors import GenloopError
from genloop.evaluate.compositional import (
    AttributeJudge,
    attribute_accuracy,
    compositional_accuracy,
    compositional_report,
    corpus_images,
    load_or_train_judge,
    store_key,
)
from genloop.workspace import Workspace, init_workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, AttributeJudge]]:
    ws = init_workspace(tmp_path_factory.mktemp("judge") / "ws")
    started = time.process_time()
    judge = load_or_train_judge(ws, 32)  # trains (seed 0) and stores
    # the whole training, corpus drawing included, on one thread (CPU seconds, so the
    # figure does not depend on what else the machine runs)
    assert time.process_time() - started < 60
    yield ws, judge
    ws.close()


def test_judge_reads_fresh_seen_and_held_out_images(
    cached: tuple[Workspace, AttributeJudge],
) -> None:
    _, judge = cached
    for split in ("seen", "held_out"):
        images, scenes = corpus_images(400, 777, 32, split)
        captions = [caption(s) for s in scenes]
        assert compositional_accuracy(judge, images, captions) >= 0.97, split
        parts = attribute_accuracy(judge, images, captions)
        assert min(parts.values()) >= 0.97, (split, parts)
    report = compositional_report(judge, *mixed(300))
    assert report["seen"]["count"] + report["held_out"]["count"] == 300
    assert report["held_out"]["count"] > 0 and report["seen"]["exact"] >= 0.97


def mixed(n: int) -> tuple[torch.Tensor, list[str]]:
    images, scenes = corpus_images(n, 5, 32, "all")
    return images, [caption(s) for s in scenes]


def test_noise_and_wrong_captions_are_not_counted_as_correct(
    cached: tuple[Workspace, AttributeJudge],
) -> None:
    _, judge = cached
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (200, 3, 32, 32), generator=g, dtype=torch.uint8)
    blank = torch.full((20, 3, 32, 32), 255, dtype=torch.uint8)
    _, captions = mixed(220)
    assert compositional_accuracy(judge, torch.cat([noise, blank]), captions) <= 0.02
    # the right images with each caption's first object recoloured: wrong colour, not exact
    images, scenes = corpus_images(200, 9, 32, "all")
    wrong = [
        Scene(
            (
                ShapeObject(
                    "green" if s.objects[0].colour != "green" else "red",
                    *(s.objects[0].shape, s.objects[0].size, s.objects[0].position),
                ),
                *s.objects[1:],
            )
        )
        for s in scenes
    ]
    parts = attribute_accuracy(judge, images, [caption(s) for s in wrong])
    assert parts["exact"] <= 0.02 and parts["position"] >= 0.97
    assert parts["colour"] < 0.8 and parts["shape"] >= 0.97
    # an object left out of the caption is an extra object
    dropped = [Scene(s.objects[:-1]) for s in scenes if len(s.objects) > 1]
    keep = [i for i, s in enumerate(scenes) if len(s.objects) > 1]
    parts = attribute_accuracy(judge, images[keep], [caption(s) for s in dropped])
    assert parts["exact"] <= 0.02 and parts["no_extra"] <= 0.02


def test_judge_is_cached_as_safetensors_and_reloaded(
    cached: tuple[Workspace, AttributeJudge],
) -> None:
    ws, judge = cached
    path = ws.store.open_verified(store_key(32))
    assert (path / "model" / "model.safetensors").is_file()
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.bin"))
    started = time.perf_counter()
    again = load_or_train_judge(ws, 32)
    assert time.perf_counter() - started < 5  # loaded, not retrained
    for a, b in zip(judge.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    images, _ = corpus_images(50, 3, 32)
    assert judge.predict(images) == again.predict(images)
    # a tampered weight file is refused, never silently used
    weights = path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(GenloopError):
        load_or_train_judge(ws, 32)


def test_bad_inputs_are_clear_errors(cached: tuple[Workspace, AttributeJudge]) -> None:
    _, judge = cached
    image = torch.from_numpy(render(Scene((ShapeObject("red", "circle", "large", "left"),))))
    image = image.permute(2, 0, 1)[None].contiguous()
    assert judge.predict(image) == [Scene((ShapeObject("red", "circle", "large", "left"),))]
    with pytest.raises(GenloopError, match="not a shapes-corpus caption"):
        compositional_accuracy(judge, image, ["a photo of a cat"])
    with pytest.raises(GenloopError, match="1 images but 2 captions"):
        compositional_accuracy(judge, image, ["a large red circle on the left"] * 2)
    with pytest.raises(GenloopError, match="trained on 32×32"):
        judge.predict(torch.zeros((1, 3, 16, 16), dtype=torch.uint8))
    with pytest.raises(GenloopError, match="uint8 RGB"):
        judge.predict(image.float())
