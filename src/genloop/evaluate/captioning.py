"""The ``captioning`` suite: how well a captioning model describes images.

    1. the seen images    the dataset's evaluation split (``eval.split``) and its captions
    2. the held-out ones  when the captions are shapes-corpus captions: scenes drawn by
                          ``genloop.data.shapes.generate(split="held_out")``, each holding a
                          (colour, shape) pair no training image had
    3. caption            greedy search (``models.captioning.caption``)
    4. score              corpus BLEU (sacrebleu, one reference per image) and attribute
                          accuracy: each caption parsed back into a scene
                          (``shapes.parse_caption``) and compared with the true one

Metrics, each with a ``_seen`` and a ``_held_out`` suffix (the second only for shapes data):

- ``bleu``: sacrebleu's corpus BLEU (0-100) against the reference caption;
- ``scene_accuracy``: the parsed caption is exactly the true scene;
- ``parse_rate``: the caption parses as a corpus caption at all;
- ``colour_accuracy``, ``shape_accuracy``, ``size_accuracy``: over the true objects, the
  caption puts an object of that colour (shape, size) at the object's position;
- ``pair_accuracy``: the same for colour and shape together (the held-out combinations are
  (colour, shape) pairs, so this is the compositional figure);
- ``position_accuracy``: the caption names exactly the occupied positions.

A caption that does not parse scores 0 on every attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from genloop.errors import GenloopError
from genloop.evaluate.results import SuiteResult

if TYPE_CHECKING:
    from pathlib import Path

    from torch import Tensor, nn
    from transformers import PreTrainedTokenizerBase

    from genloop.config import EvalConfig
    from genloop.data.shapes import Scene

SAMPLES_PER_GROUP = 8  # examples kept for the report, per group
ATTRIBUTES = ("colour", "shape", "size")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with one reference per hypothesis."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise GenloopError(f"{len(hypotheses)} captions for {len(references)} references")
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def scene_scores(hypothesis: str, truth: Scene) -> dict[str, float]:
    """Per-caption attribute scores in [0, 1] of ``hypothesis`` against the true scene."""
    from genloop.data.shapes import parse_caption

    parsed = parse_caption(hypothesis)
    if parsed is None:
        return {
            "scene": 0.0,
            "parse": 0.0,
            **{a: 0.0 for a in ATTRIBUTES},
            "pair": 0.0,
            "position": 0.0,
        }
    at = {o.position: o for o in parsed.objects}
    objects = truth.objects

    def share(ok: Callable[[Any, Any], bool]) -> float:
        hits = sum(1 for o in objects if o.position in at and ok(at[o.position], o))
        return hits / len(objects)

    scores = {
        "scene": float(parsed == truth),
        "parse": 1.0,
        "colour": share(lambda p, o: p.colour == o.colour),
        "shape": share(lambda p, o: p.shape == o.shape),
        "size": share(lambda p, o: p.size == o.size),
        "pair": share(lambda p, o: (p.colour, p.shape) == (o.colour, o.shape)),
        "position": float(set(at) == {o.position for o in objects}),
    }
    return scores


def score_group(
    hypotheses: Sequence[str], references: Sequence[str], scenes: Sequence[Scene] | None
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The group's metrics (unsuffixed names) and per-image scene correctness.

    ``scenes`` None (captions that are not corpus captions): BLEU only."""
    metrics = {"bleu": corpus_bleu(hypotheses, references)}
    if scenes is None:
        return metrics, {}
    rows = [scene_scores(h, s) for h, s in zip(hypotheses, scenes, strict=True)]
    n = max(len(rows), 1)
    metrics["scene_accuracy"] = sum(r["scene"] for r in rows) / n
    metrics["parse_rate"] = sum(r["parse"] for r in rows) / n
    for key in (*ATTRIBUTES, "pair", "position"):
        metrics[f"{key}_accuracy"] = sum(r[key] for r in rows) / n
    return metrics, {"scene_accuracy": [r["scene"] for r in rows]}


def held_out_images(n: int, seed: int, size: int) -> tuple[Tensor, list[str], list[Scene]]:
    """``n`` shapes-corpus images (uint8 n×3×size×size) whose scenes hold a held-out pair."""
    import numpy as np
    import torch

    from genloop.data.shapes import generate

    items = list(generate(n, seed, size=size, split="held_out"))
    images = torch.from_numpy(np.stack([im for im, _, _ in items])).permute(0, 3, 1, 2)
    return images.contiguous(), [c for _, c, _ in items], [s for _, _, s in items]


def evaluate_captioning(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    images: Tensor,
    references: Sequence[str],
    *,
    max_samples: int | None = 200,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    seed: int = 0,
    split: str = "test",
) -> SuiteResult:
    """Caption ``images`` (uint8 N×C×H×W, the dataset's seen images) and, for shapes-corpus
    captions, as many held-out images; score both groups (see the module docstring)."""
    from genloop.data.shapes import HELD_OUT, parse_caption
    from genloop.models.captioning import caption

    n = len(references) if max_samples is None else min(max_samples, len(references))
    if n == 0:
        raise GenloopError(f"the {split} split has no captioned images to evaluate")
    images, references = images[:n], list(references[:n])
    parsed = [parse_caption(r) for r in references]
    shapes = all(p is not None for p in parsed)
    groups: dict[str, tuple[Tensor, list[str], list[Scene] | None]] = {
        "seen": (images, references, [p for p in parsed if p is not None] if shapes else None)
    }
    if shapes:
        side = int(images.shape[-1])
        groups["held_out"] = held_out_images(n, seed, side)

    metrics: dict[str, float] = {}
    per_sample: dict[str, list[float]] = {}
    samples: list[dict[str, Any]] = []
    for group, (group_images, refs, scenes) in groups.items():
        hyps = caption(model, tokenizer, group_images, max_new_tokens, num_beams)
        found, rows = score_group(hyps, refs, scenes)
        metrics.update({f"{k}_{group}": v for k, v in found.items()})
        per_sample.update({f"{k}_{group}": v for k, v in rows.items()})
        samples += [
            {"group": group, "reference": r, "caption": h}
            for r, h in list(zip(refs, hyps, strict=True))[:SAMPLES_PER_GROUP]
        ]
    settings = {
        "split": split,
        "images_per_group": n,
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "seed": seed,
        "held_out_pairs": sorted(map(list, HELD_OUT)) if shapes else None,
        "bleu": "sacrebleu corpus_bleu, tokenize 13a, one reference",
    }
    return SuiteResult("captioning", metrics, per_sample, samples, settings)


def run_captioning_suite(
    model_dir: Path, data_dir: Path, dataset_ref: str, cfg: EvalConfig, device: str
) -> SuiteResult:
    """The ``captioning`` suite of ``genloop eval`` on the dataset's ``cfg.split`` split."""
    from genloop.data.images import caption_split
    from genloop.models.captioning import load_captioner

    found = caption_split(data_dir, cfg.split)
    if found is None:
        raise GenloopError(
            f"dataset {dataset_ref} has no captioned {cfg.split} split; choose another with "
            "--set eval.split=val (or test), or a captioned dataset with --dataset"
        )
    model, tokenizer = load_captioner(model_dir, device=device)
    return evaluate_captioning(
        model,
        tokenizer,
        found[0],
        found[1],
        max_samples=cfg.max_samples,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        split=cfg.split,
    )
