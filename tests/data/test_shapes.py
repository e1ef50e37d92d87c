import itertools

import numpy as np
import pytest

from genloop.data import shapes
from genloop.data.shapes import (
    COLOURS,
    HELD_OUT,
    POSITIONS,
    RGB,
    Scene,
    ShapeObject,
    caption,
    generate,
    parse_caption,
    random_scene,
    render,
    slot_bounds,
)


def test_generate_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    a = list(generate(50, seed=3))
    b = list(generate(50, seed=3))
    c = list(generate(50, seed=4))
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b, strict=True))
    assert [x[1] for x in a] != [x[1] for x in c]
    # a prefix of a longer run is the shorter run
    assert [x[1] for x in generate(20, seed=3)] == [x[1] for x in a[:20]]


def test_images_vary_for_one_caption() -> None:
    scene = Scene((ShapeObject("red", "circle", "large", "center"),))
    rng = np.random.default_rng(0)
    drawn = {render(scene, 32, rng).tobytes() for _ in range(20)}
    assert len(drawn) > 5


@pytest.mark.parametrize("split", ["seen", "held_out", "all"])
def test_caption_round_trips_through_parse(split: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(2000):
        scene = random_scene(rng, split=split)  # type: ignore[arg-type]
        assert parse_caption(caption(scene)) == scene


def test_parse_caption_tolerates_case_spacing_and_order_and_refuses_non_captions() -> None:
    scene = parse_caption("  A small BLUE square on the right,  a large red circle in the middle. ")
    assert scene == Scene(
        (
            ShapeObject("red", "circle", "large", "center"),
            ShapeObject("blue", "square", "small", "right"),
        )
    )
    for bad in (
        "",
        "a red circle on the left",  # no size
        "a large red circle",  # no position
        "a large pink circle on the left",
        "a large red circle on the left and a small red square on the left",  # one slot twice
        "a large red circle on the left and",
        "a large red circle on the left; a small red square on the right",
        "a large red circle on the left and a large red circle in the center, a small red"
        " square on the right and a small red square on the left",
    ):
        assert parse_caption(bad) is None, bad


def test_seen_split_never_draws_held_out_pairs_and_held_out_split_always_does() -> None:
    rng = np.random.default_rng(2)
    seen = [random_scene(rng, split="seen") for _ in range(3000)]
    held = [random_scene(rng, split="held_out") for _ in range(1000)]
    every = [random_scene(rng, split="all") for _ in range(3000)]
    assert not any(s.held_out() for s in seen)
    assert all(s.held_out() for s in held)
    assert any(s.held_out() for s in every) and not all(s.held_out() for s in every)
    # the seen split still covers every other pair, and every held-out pair appears
    seen_pairs = {(o.colour, o.shape) for s in seen for o in s.objects}
    assert seen_pairs == {p for p in itertools.product(COLOURS, shapes.SHAPES)} - HELD_OUT
    assert {(o.colour, o.shape) for s in held for o in s.objects} >= HELD_OUT
    counts = {len(s.objects) for s in seen}
    assert counts == {1, 2, 3}
    for _, text, scene in generate(500, seed=5):
        assert not scene.held_out() and parse_caption(text) == scene


def test_colours_are_well_separated_and_drawn_exactly() -> None:
    for a, b in itertools.combinations(COLOURS, 2):
        assert max(abs(x - y) for x, y in zip(RGB[a], RGB[b], strict=True)) >= 100, (a, b)
    for colour in COLOURS:
        image = render(Scene((ShapeObject(colour, "square", "large", "left"),)))
        pixels = {tuple(int(v) for v in p) for p in image.reshape(-1, 3)}
        assert pixels == {RGB[colour], shapes.BACKGROUND}


@pytest.mark.parametrize("size", [32, 64, 17])
def test_objects_stay_inside_their_slot(size: int) -> None:
    rng = np.random.default_rng(6)
    for _ in range(300):
        scene = random_scene(rng, split="all", max_objects=1)
        image = render(scene, size, rng)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        ink = np.argwhere((image != 255).any(axis=2))
        assert len(ink) > 0
        lo, hi = slot_bounds(scene.objects[0].position, size)
        assert lo <= ink[:, 1].min() and ink[:, 1].max() < hi
        assert ink[:, 0].min() >= 1 and ink[:, 0].max() < size - 1


def test_small_and_large_objects_differ_clearly_in_ink() -> None:
    rng = np.random.default_rng(7)
    area: dict[tuple[str, str], list[int]] = {}
    for _ in range(600):
        scene = random_scene(rng, split="all", max_objects=1)
        ink = int((render(scene, 32, rng) != 255).any(axis=2).sum())
        o = scene.objects[0]
        area.setdefault((o.shape, o.size), []).append(ink)
    for shape in shapes.SHAPES:
        assert max(area[shape, "small"]) * 1.5 < min(area[shape, "large"]), shape


def test_bad_scenes_are_refused() -> None:
    with pytest.raises(ValueError, match="colour"):
        ShapeObject("pink", "circle", "large", "left")
    with pytest.raises(ValueError, match="distinct slots"):
        Scene(
            (
                ShapeObject("red", "circle", "large", "right"),
                ShapeObject("red", "circle", "large", "left"),
            )
        )
    with pytest.raises(ValueError, match="1 to 3"):
        Scene(())
    with pytest.raises(ValueError, match="split"):
        random_scene(np.random.default_rng(0), split="train")  # type: ignore[arg-type]
    assert POSITIONS == ("left", "center", "right")
