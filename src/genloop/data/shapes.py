"""The shapes corpus: procedurally drawn scenes with compositional captions.

Each image is a white square with one to three coloured shapes in three horizontal slots
(left, center, right; at most one object per slot). Every object has a colour, a shape, a
size and a position, and the caption names them all::

    "a large red circle on the left and a small blue square on the right"

so a text-to-image model's output can be judged attribute by attribute
(:mod:`genloop.evaluate.compositional`), and captions parse back into scenes
(:func:`parse_caption`) so a captioning model's output can be scored the same way.

Some (colour, shape) pairs are held out (:data:`HELD_OUT`): ``split="seen"`` never draws
them, so a dataset built from the corpus never contains them, and ``split="held_out"``
draws scenes that contain at least one, to measure generalisation to unseen combinations.

Everything is drawn from one ``numpy`` generator, so a seed gives the same images and
captions on every machine. Pure numpy + Pillow; no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "center", "right")
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("orange", "circle")})

# Saturated and far apart in RGB (every pair differs by >= 100 in some channel), so colour
# is never ambiguous even at 32×32 without anti-aliasing.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 20, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (240, 225, 20),
    "purple": (140, 40, 170),
    "orange": (250, 120, 0),
}
BACKGROUND = (255, 255, 255)

# Object diameter as a fraction of the slot width; the ranges leave a clear gap between
# small and large whatever the jitter.
_DIAMETER = {"small": (0.45, 0.55), "large": (0.8, 0.95)}
_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
_PHRASE_TO_POSITION = {
    "on the left": "left",
    "in the center": "center",
    "in the middle": "center",
    "on the right": "right",
}

Split = Literal["seen", "held_out", "all"]


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, choices, what in (
            (self.colour, COLOURS, "colour"),
            (self.shape, SHAPES, "shape"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in choices:
                raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


@dataclass(frozen=True)
class Scene:
    """One to three objects in distinct slots, sorted left to right."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= len(POSITIONS):
            raise ValueError(f"a scene has 1 to {len(POSITIONS)} objects, not {len(self.objects)}")
        slots = [POSITIONS.index(o.position) for o in self.objects]
        if slots != sorted(set(slots)):
            raise ValueError("scene objects must sit in distinct slots, sorted left to right")

    def held_out(self, pairs: frozenset[tuple[str, str]] = HELD_OUT) -> bool:
        """Whether any object's (colour, shape) pair is one of ``pairs``."""
        return any((o.colour, o.shape) in pairs for o in self.objects)

    def to_dicts(self) -> list[dict[str, str]]:
        """The objects as plain dicts (for JSON metadata)."""
        return [
            {"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position}
            for o in self.objects
        ]


def caption(scene: Scene) -> str:
    """``"a large red circle on the left and a small blue square on the right"``.

    Objects are listed left to right, joined by ", " and a final " and ".
    """
    parts = [f"a {o.size} {o.colour} {o.shape} {_PHRASE[o.position]}" for o in scene.objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


_OBJECT = re.compile(
    r"an? (?P<size>{sizes}) (?P<colour>{colours}) (?P<shape>{shapes}) (?P<where>{wheres})".format(
        sizes="|".join(SIZES),
        colours="|".join(COLOURS),
        shapes="|".join(SHAPES),
        wheres="|".join(re.escape(p) for p in _PHRASE_TO_POSITION),
    )
)
_SEPARATOR = re.compile(r"(?:,\s*and|,|and)")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None when it is not a corpus caption.

    The inverse of :func:`caption`, tolerant of case, extra whitespace, a trailing full
    stop, "in the middle" for "in the center" and any order of the objects (a generated
    caption may list them in another order). Two objects in one slot is not a scene: None.
    """
    rest = " ".join(text.lower().split()).rstrip(".").strip()
    objects: list[ShapeObject] = []
    while True:
        match = _OBJECT.match(rest)
        if match is None:
            return None
        objects.append(
            ShapeObject(
                colour=match["colour"],
                shape=match["shape"],
                size=match["size"],
                position=_PHRASE_TO_POSITION[match["where"]],
            )
        )
        rest = rest[match.end() :].strip()
        if not rest:
            break
        separator = _SEPARATOR.match(rest)
        if separator is None:
            return None
        rest = rest[separator.end() :].strip()
    objects.sort(key=lambda o: POSITIONS.index(o.position))
    if len({o.position for o in objects}) != len(objects) or len(objects) > len(POSITIONS):
        return None
    return Scene(tuple(objects))


def _pairs(split: Split) -> list[tuple[str, str]]:
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "seen":
        return [p for p in every if p not in HELD_OUT]
    if split == "held_out":
        return sorted(HELD_OUT)
    return every


def random_scene(rng: np.random.Generator, *, split: Split = "seen", max_objects: int = 3) -> Scene:
    """A random scene: 1..``max_objects`` objects in random distinct slots.

    ``split="seen"``: no object has a held-out (colour, shape) pair. ``"held_out"``: at
    least one object has one (the others are drawn from every pair). ``"all"``: any pair.
    """
    if split not in ("seen", "held_out", "all"):
        raise ValueError(f"split must be 'seen', 'held_out' or 'all', not {split!r}")
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be 1 to {len(POSITIONS)}, not {max_objects}")
    count = int(rng.integers(1, max_objects + 1))
    slots = sorted(int(i) for i in rng.choice(len(POSITIONS), size=count, replace=False))
    special = int(rng.integers(count))  # the object that carries a held-out pair
    objects = []
    for i, slot in enumerate(slots):
        if split == "held_out":
            pairs = _pairs("held_out" if i == special else "all")
        else:
            pairs = _pairs(split)
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        objects.append(ShapeObject(colour, shape, size, POSITIONS[slot]))
    return Scene(tuple(objects))


def slot_bounds(position: str, size: int) -> tuple[int, int]:
    """Pixel columns ``[lo, hi)`` of a position's slot in a ``size``-wide image."""
    i = POSITIONS.index(position)
    n = len(POSITIONS)
    return round(i * size / n), round((i + 1) * size / n)


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``scene`` as a uint8 (size, size, 3) RGB array on a white background.

    With ``rng``, each object's diameter and position jitter a little (its size class and
    slot never change: the object stays inside its slot's columns); without, objects are
    drawn at the middle of their ranges, centred in their slots.
    """
    from PIL import Image, ImageDraw

    if size < 12:
        raise ValueError(f"size must be at least 12 pixels, not {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        lo, hi = slot_bounds(o.position, size)
        width = hi - lo
        low, high = _DIAMETER[o.size]
        fraction = (low + high) / 2 if rng is None else float(rng.uniform(low, high))
        d = max(3, min(width, round(fraction * width)))
        # Free room in the slot horizontally and in the image vertically; jitter within
        # part of it so objects stay clear of the slot edges and the image border.
        room_x = width - d
        room_y = size - d - 2
        if rng is None:
            x0 = lo + room_x // 2
            y0 = 1 + room_y // 2
        else:
            x0 = lo + room_x // 2 + int(rng.integers(-(room_x // 2), room_x - room_x // 2 + 1))
            y0 = 1 + room_y // 2 + int(rng.integers(-(room_y // 4), room_y // 4 + 1))
        x1, y1 = x0 + d - 1, y0 + d - 1  # inclusive box
        fill = RGB[o.colour]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return np.asarray(image, dtype=np.uint8)


def generate(
    n: int,
    seed: int = 0,
    *,
    size: int = 32,
    split: Split = "seen",
    max_objects: int = 3,
) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """``n`` (image, caption, scene) triples, the same for the same arguments.

    Images are uint8 (size, size, 3). One generator drives scenes and jitter, so the
    first ``k`` items of ``generate(n, seed)`` equal ``generate(k, seed)``.
    """
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = random_scene(rng, split=split, max_objects=max_objects)
        yield render(scene, size, rng), caption(scene), scene
