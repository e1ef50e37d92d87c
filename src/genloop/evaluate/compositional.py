"""Compositional accuracy: does a generated image show what its caption says?

The referee is an attribute judge, a small CNN trained on images of the shapes corpus
(:mod:`genloop.data.shapes`) of *every* (colour, shape) combination, held-out pairs
included: it judges the model, it is not the model. For each of the three position slots
it predicts a colour (or empty), a shape (or empty) and a size::

    x (B, 3, H, W) in [-1, 1] → conv 3×3 → [conv 4×4 stride 2]… (to ≤ 8 px) → conv 3×3
      → flatten → linear → ReLU (B, 128) → linear (B, 3 × (7 + 4 + 2))

An image counts as correct when the judge's scene equals the caption's scene: every
captioned object with its colour, shape and size in its slot, and nothing in the other
slots. A few pure-noise images labelled empty are mixed into training, so an image that
shows no scene at all is judged empty (never correct: a caption names at least one object).

The judge is trained from a seed (deterministic on one machine), in well under a minute on
one core, and cached in the workspace's artifact store as safetensors
(``judges/shapes/<size>px/judge-v<VERSION>``), like the image classifier of
:mod:`genloop.evaluate.classifier`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genloop.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapeObject
from genloop.errors import ConflictError, GenloopError

if TYPE_CHECKING:
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

FORMAT = "genloop-shapes-judge"
VERSION = 1  # bump when the architecture, its training or the corpus drawing changes
META_FILE = "judge.json"
STEPS = 400
BATCH = 64
LR = 3e-3
NOISE_SHARE = 0.03  # of training images: pure noise, labelled "no object anywhere"

_EMPTY_COLOUR = len(COLOURS)
_EMPTY_SHAPE = len(SHAPES)
_HEAD = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES))  # per slot: colour, shape, size


class AttributeJudge(nn.Module):
    """Per slot: colour (+ empty), shape (+ empty) and size logits."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        size, width = int(config["image_size"]), int(config.get("width", 16))
        # BatchNorm: the judge must learn fast (≤ a minute on one core)
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU())
        w, side = width, size
        while side > 8 and side % 2 == 0:
            layers += [nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.BatchNorm2d(2 * w)]
            layers.append(nn.ReLU())
            w, side = 2 * w, side // 2
        layers += [nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.hidden = nn.Linear(w * side * side, 128)
        self.head = nn.Linear(128, len(POSITIONS) * sum(_HEAD))

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1] → logits of colour (B, 3, 7), shape (B, 3, 4) and
        size (B, 3, 2), one row per slot (left, center, right)."""
        out = self.head(F.relu(self.hidden(self.body(x).flatten(1))))
        out = out.view(x.shape[0], len(POSITIONS), sum(_HEAD))
        colour, shape, size = out.split(_HEAD, dim=-1)
        return colour, shape, size

    @torch.no_grad()
    def predict(self, images: Tensor, batch: int = 512) -> list[Scene | None]:
        """The scene the judge sees in each uint8 image (N, 3, H, W); None where it sees no
        object at all."""
        from genloop.data.images import normalize

        _check_images(images, self.image_size)
        scenes: list[Scene | None] = []
        for i in range(0, images.shape[0], batch):
            colour, shape, size = self(normalize(images[i : i + batch]))
            c, s, z = colour.argmax(-1), shape.argmax(-1), size.argmax(-1)  # (b, 3) each
            for row in range(c.shape[0]):
                objects = tuple(
                    ShapeObject(
                        COLOURS[int(c[row, k])],
                        SHAPES[int(s[row, k])],
                        SIZES[int(z[row, k])],
                        POSITIONS[k],
                    )
                    for k in range(len(POSITIONS))
                    if int(c[row, k]) != _EMPTY_COLOUR and int(s[row, k]) != _EMPTY_SHAPE
                )
                scenes.append(Scene(objects) if objects else None)
        return scenes


def _check_images(images: Tensor, size: int) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise GenloopError(
            f"the shapes judge takes uint8 RGB images (N, 3, H, W), not {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if images.shape[-2:] != (size, size):
        raise GenloopError(
            f"the shapes judge was trained on {size}×{size} images; these are "
            f"{images.shape[-2]}×{images.shape[-1]}"
        )


def scene_targets(scenes: Sequence[Scene | None]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-slot class ids (N, 3) of colour, shape and size; size is -100 (ignored) where
    the slot is empty."""
    n = len(scenes)
    colour = torch.full((n, len(POSITIONS)), _EMPTY_COLOUR, dtype=torch.long)
    shape = torch.full((n, len(POSITIONS)), _EMPTY_SHAPE, dtype=torch.long)
    size = torch.full((n, len(POSITIONS)), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects if scene is not None else ():
            k = POSITIONS.index(o.position)
            colour[i, k] = COLOURS.index(o.colour)
            shape[i, k] = SHAPES.index(o.shape)
            size[i, k] = SIZES.index(o.size)
    return colour, shape, size


def corpus_images(n: int, seed: int, size: int, split: str = "all") -> tuple[Tensor, list[Scene]]:
    """``n`` corpus images as uint8 (n, 3, size, size) with their scenes."""
    import numpy as np

    from genloop.data.shapes import generate

    items = list(generate(n, seed, size=size, split=split))  # type: ignore[arg-type]
    if not items:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8), []
    pixels = np.stack([image for image, _, _ in items]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(pixels)), [scene for _, _, scene in items]


def train_judge(
    size: int = 32,
    seed: int = 0,
    n: int = 20000,
    *,
    steps: int = STEPS,
    batch_size: int = BATCH,
) -> AttributeJudge:
    """A judge trained on ``n`` corpus images of every combination drawn from ``seed``
    (plus a few noise images judged empty); the same arguments give the same weights on
    one machine. Augmentation: pixel noise and 1-pixel shifts, so slightly blurred or noisy
    generated images are still read."""
    from genloop.data.images import augment, normalize

    if n < 2:
        raise GenloopError(f"training the shapes judge needs at least 2 images, not {n}")
    images, scenes = corpus_images(n, seed, size)
    g = torch.Generator().manual_seed(seed)
    noise = max(1, round(n * NOISE_SHARE))
    noise_images = torch.randint(0, 256, (noise, 3, size, size), generator=g, dtype=torch.uint8)
    data = normalize(torch.cat([images, noise_images]))
    colour, shape, size_t = scene_targets([*scenes, *([None] * noise)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeJudge({"image_size": size, "width": 16})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        lr = LR * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi))).item()
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        x = augment(data[idx], g, flip=False, crop_pad=1, jitter=0.0)
        x = x + 0.08 * torch.randn(x.shape, generator=g) * torch.rand(
            batch_size, 1, 1, 1, generator=g
        )
        c, s, z = model(x)
        loss = (
            F.cross_entropy(c.flatten(0, 1), colour[idx].flatten())
            + F.cross_entropy(s.flatten(0, 1), shape[idx].flatten())
            + F.cross_entropy(z.flatten(0, 1), size_t[idx].flatten(), ignore_index=-100)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- scoring


def caption_scenes(captions: Sequence[str]) -> list[Scene]:
    """The scene of each caption; a caption outside the corpus' grammar is an error."""
    from genloop.data.shapes import parse_caption

    scenes = []
    for text in captions:
        scene = parse_caption(text)
        if scene is None:
            raise GenloopError(
                f"caption {text!r} is not a shapes-corpus caption (e.g. 'a large red circle "
                "on the left'): compositional accuracy cannot judge it"
            )
        scenes.append(scene)
    return scenes


def compositional_accuracy(judge: AttributeJudge, images: Tensor, captions: Sequence[str]) -> float:
    """Fraction of uint8 images (N, 3, H, W) whose scene, as the judge sees it, is exactly
    their caption's: every object's colour, shape and size in its slot, no extra objects."""
    return attribute_accuracy(judge, images, captions)["exact"]


def attribute_accuracy(
    judge: AttributeJudge, images: Tensor, captions: Sequence[str]
) -> dict[str, float]:
    """The per-attribute breakdown, for reports.

    Over the captioned objects: ``position`` (an object is seen in its slot), ``colour``,
    ``shape``, ``size`` (seen there with the captioned value; a missed object counts as
    wrong for each); over the images: ``no_extra`` (nothing in the uncaptioned slots) and
    ``exact`` (the whole scene right). NaN for no images.
    """
    truth = caption_scenes(captions)
    if len(truth) != images.shape[0]:
        raise GenloopError(f"{images.shape[0]} images but {len(truth)} captions")
    if not truth:
        return {
            k: float("nan") for k in ("exact", "position", "colour", "shape", "size", "no_extra")
        }
    seen = judge.predict(images)
    hits = {"position": 0, "colour": 0, "shape": 0, "size": 0}
    objects = exact = no_extra = 0
    for want, got in zip(truth, seen, strict=True):
        found = {o.position: o for o in (got.objects if got is not None else ())}
        exact += want == got
        named = {o.position for o in want.objects}
        no_extra += not (found.keys() - named)
        for o in want.objects:
            objects += 1
            g = found.get(o.position)
            if g is None:
                continue
            hits["position"] += 1
            hits["colour"] += g.colour == o.colour
            hits["shape"] += g.shape == o.shape
            hits["size"] += g.size == o.size
    out = {k: v / objects for k, v in hits.items()}
    return {"exact": exact / len(truth), **out, "no_extra": no_extra / len(truth)}


def compositional_report(
    judge: AttributeJudge, images: Tensor, captions: Sequence[str]
) -> dict[str, dict[str, float]]:
    """:func:`attribute_accuracy` apart for captions of seen combinations and of held-out
    ones (any object with a held-out (colour, shape) pair), each with its ``count``."""
    truth = caption_scenes(captions)
    out: dict[str, dict[str, float]] = {}
    for name, want in (("seen", False), ("held_out", True)):
        idx = [i for i, s in enumerate(truth) if s.held_out() == want]
        part = attribute_accuracy(judge, images[idx], [captions[i] for i in idx])
        out[name] = {**part, "count": float(len(idx))}
    return out


# ---------------------------------------------------------------------------- caching


def store_key(size: int) -> str:
    return f"judges/shapes/{size}px/judge-v{VERSION}"


def load_or_train_judge(ws: Workspace | None, size: int = 32) -> AttributeJudge:
    """The judge for ``size``-pixel images: loaded from the workspace's artifact store
    (files verified against their manifest, weights from safetensors), else trained (seed
    0) and stored there. Without a workspace it is trained and not kept."""
    from genloop.models.image_io import load_state, read_config, save_module_dir

    if ws is None:
        return train_judge(size)
    key = store_key(size)
    if not ws.store.exists(key):
        started = time.perf_counter()
        judge = train_judge(size)
        seconds = time.perf_counter() - started
        images, scenes = corpus_images(1000, 10_000 + size, size)
        exact = sum(a == b for a, b in zip(judge.predict(images), scenes, strict=True))
        meta = {
            "kind": "shapes-judge",
            "image_size": size,
            "seed": 0,
            "train_images": 20000,
            "steps": STEPS,
            "version": VERSION,
            "fresh_exact_accuracy": exact / len(scenes),
            "train_seconds": round(seconds, 1),
            "artifact": key,
        }
        try:
            with ws.store.writer(key) as staging:
                save_module_dir(judge, staging / "model", FORMAT, judge.config)
                (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
            log.info("trained the %dpx shapes judge (exact accuracy %.3f)", size, exact / 1000)
            return judge
        except ConflictError:  # another process stored it meanwhile: use theirs
            pass
    path = ws.store.open_verified(key)
    judge = AttributeJudge(read_config(path / "model", FORMAT))
    load_state(judge, path / "model")
    return judge.eval().requires_grad_(False)
