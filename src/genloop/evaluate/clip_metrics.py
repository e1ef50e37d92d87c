"""CLIP metrics and the ``clip`` eval suite: zero-shot classification, image↔text retrieval
recall@k, CLIP score, and zero-shot attribute accuracy on the shapes corpus.

Every metric is a cosine similarity between L2-normalised image and text embeddings
(``models/clip.py``: ``image_features``, ``text_features``):

- zero-shot classification: each image takes the class whose prompt embedding (the mean of
  its prompts' embeddings, renormalised, when a class has several) is nearest;
- retrieval recall@k: the share of queries whose right answer is among the k nearest. A
  small captioned corpus repeats captions, so "right" means the same caption text: an
  image's query succeeds when a retrieved text equals its caption, a text's when a
  retrieved image carries that text;
- CLIP score (Hessel et al., 2021): the mean over matched pairs of 100 · max(cos, 0);
- attribute zero-shot (shapes corpus): a single-object image picks among the captions of
  every colour × shape × size × position; colour, shape, their joint and the exact scene
  are scored separately.

The ``clip`` suite reports these for seen combinations (the dataset's test split, and
fresh single-object corpus images of seen pairs) and for held-out ones (corpus images of
the pairs no dataset contains), under ``…_seen`` and ``…_held_out`` names.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from genloop.errors import GenloopError
from genloop.evaluate.results import SuiteResult

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from genloop.config import EvalConfig
    from genloop.data.shapes import Scene
    from genloop.workspace.datasets import DatasetVersionInfo
    from genloop.workspace.registry import ModelVersionInfo
    from genloop.workspace.workspace import Workspace

KS = (1, 5, 10)
ATTRIBUTE_IMAGES = 300  # single-object images per split for the attribute zero-shot
HELD_OUT_SEED = 1_000_003  # corpus images apart from any dataset's seeds


# ------------------------------------------------------------------- from similarities


def zero_shot_from_similarity(sim: Tensor, labels: Tensor) -> float:
    """Accuracy of argmax over classes of ``sim`` (N, K) against ``labels`` (N,)."""
    if sim.shape[0] != labels.shape[0]:
        raise GenloopError(f"{sim.shape[0]} images but {labels.shape[0]} labels")
    if sim.shape[0] == 0:
        raise GenloopError("zero-shot accuracy needs at least one image")
    return float((sim.argmax(dim=1) == labels.to(sim.device)).float().mean())


def recall_from_similarity(
    sim: Tensor, image_caption: Sequence[str], texts: Sequence[str], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall@k both ways from ``sim`` (N images, M texts); image i's caption is
    ``image_caption[i]``. ``image_to_text_recall@k``: a top-k text equals the image's
    caption; ``text_to_image_recall@k``: a top-k image's caption equals the text."""
    n, m = sim.shape
    if n != len(image_caption) or m != len(texts) or n == 0 or m == 0:
        raise GenloopError(f"recall needs matching, non-empty sides (got {n}×{m} similarities)")
    ids = {t: i for i, t in enumerate(dict.fromkeys([*texts, *image_caption]))}
    img = torch.tensor([ids[c] for c in image_caption])
    txt = torch.tensor([ids[t] for t in texts])
    match = img[:, None] == txt[None, :]  # (N, M): text j is right for image i
    out: dict[str, float] = {}
    for k in ks:
        top_t = sim.topk(min(k, m), dim=1).indices.cpu()  # (N, k) texts per image
        top_i = sim.t().topk(min(k, n), dim=1).indices.cpu()  # (M, k) images per text
        i2t = match.gather(1, top_t).any(dim=1).float().mean()
        t2i = match.t().gather(1, top_i).any(dim=1).float().mean()
        out[f"image_to_text_recall@{k}"] = float(i2t)
        out[f"text_to_image_recall@{k}"] = float(t2i)
    return out


def clip_score_from_features(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Per pair 100 · max(cos, 0) of aligned, L2-normalised features (N, D) → (N,)."""
    if image_feats.shape != text_feats.shape:
        raise GenloopError(
            f"CLIP score needs one text per image ({image_feats.shape[0]} images, "
            f"{text_feats.shape[0]} texts)"
        )
    return 100.0 * (image_feats * text_feats).sum(dim=1).clamp(min=0.0)


# ------------------------------------------------------------------------- with a model


def zero_shot_accuracy(
    model: Any,
    tok: PreTrainedTokenizerBase,
    images: Tensor,
    labels: Tensor,
    class_prompts: Sequence[str | Sequence[str]],
) -> float:
    """Zero-shot classification accuracy of uint8 ``images`` (N, C, H, W) with class ids
    ``labels`` (N,); ``class_prompts[k]`` is class k's prompt or list of prompts."""
    from genloop.models.clip import image_features

    classes = class_embeddings(model, tok, class_prompts)
    return zero_shot_from_similarity(image_features(model, images) @ classes.t(), labels)


def class_embeddings(
    model: Any, tok: PreTrainedTokenizerBase, class_prompts: Sequence[str | Sequence[str]]
) -> Tensor:
    """(K, D) one normalised embedding per class: its prompts' mean, renormalised."""
    from genloop.models.clip import text_features

    groups = [[p] if isinstance(p, str) else list(p) for p in class_prompts]
    if not groups or any(not g for g in groups):
        raise GenloopError("zero-shot classification needs at least one prompt per class")
    feats = text_features(model, tok, [p for g in groups for p in g])
    sizes = torch.tensor([len(g) for g in groups])
    owner = torch.repeat_interleave(torch.arange(len(groups)), sizes)
    sums = torch.zeros(len(groups), feats.shape[1]).index_add_(0, owner, feats.cpu())
    return torch.nn.functional.normalize(sums, dim=-1).to(feats.device)


def retrieval_recall(
    model: Any,
    tok: PreTrainedTokenizerBase,
    images: Tensor,
    texts: Sequence[str],
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Image↔text recall@k over aligned pairs (image i is captioned ``texts[i]``); the
    candidates are the distinct texts (for images) and all the images (for texts)."""
    from genloop.models.clip import image_features, text_features

    distinct = list(dict.fromkeys(texts))
    sim = image_features(model, images) @ text_features(model, tok, distinct).t()
    return recall_from_similarity(sim, list(texts), distinct, ks)


def clip_scores(
    model: Any, tok: PreTrainedTokenizerBase, images: Tensor, texts: Sequence[str]
) -> Tensor:
    """Per pair CLIP score (N,) of aligned uint8 images and texts."""
    from genloop.models.clip import image_features, text_features

    if len(texts) != images.shape[0]:
        raise GenloopError(
            f"CLIP score needs one text per image ({images.shape[0]} images, {len(texts)} texts)"
        )
    return clip_score_from_features(image_features(model, images), text_features(model, tok, texts))


def clip_score(
    model: Any, tok: PreTrainedTokenizerBase, images: Tensor, texts: Sequence[str]
) -> float:
    """The mean CLIP score, 100 · max(cos, 0), of aligned uint8 images and texts."""
    return float(clip_scores(model, tok, images, texts).mean())


def attribute_candidates() -> list[Scene]:
    """Every single-object scene: colour × shape × size × position (6·3·2·3 = 108)."""
    from genloop.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapeObject

    return [
        Scene((ShapeObject(c, s, z, p),))
        for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)
    ]


def attribute_zero_shot(
    model: Any, tok: PreTrainedTokenizerBase, images: Tensor, scenes: Sequence[Scene]
) -> dict[str, Any]:
    """Zero-shot attributes of single-object shapes images: each picks the nearest of the
    :func:`attribute_candidates` captions. Returns ``colour``, ``shape``, ``joint``
    (colour and shape), ``exact`` (all four) accuracies and per-image ``joint_hits``."""
    from genloop.data.shapes import caption
    from genloop.models.clip import image_features, text_features

    if any(len(s.objects) != 1 for s in scenes):
        raise GenloopError("attribute zero-shot takes single-object scenes")
    if len(scenes) != images.shape[0] or not scenes:
        raise GenloopError(f"{images.shape[0]} images but {len(scenes)} scenes")
    candidates = attribute_candidates()
    sim = (
        image_features(model, images)
        @ text_features(model, tok, [caption(c) for c in candidates]).t()
    )
    picked = [candidates[i].objects[0] for i in sim.argmax(dim=1).tolist()]
    truth = [s.objects[0] for s in scenes]
    colour = [p.colour == t.colour for p, t in zip(picked, truth, strict=True)]
    shape = [p.shape == t.shape for p, t in zip(picked, truth, strict=True)]
    joint = [a and b for a, b in zip(colour, shape, strict=True)]
    exact = [p == t for p, t in zip(picked, truth, strict=True)]

    def mean(xs: list[bool]) -> float:
        return sum(xs) / len(xs)

    return {
        "colour": mean(colour),
        "shape": mean(shape),
        "joint": mean(joint),
        "exact": mean(exact),
        "joint_hits": [float(x) for x in joint],
    }


def corpus_images(
    n: int, seed: int, size: int, split: str, max_objects: int
) -> tuple[Tensor, list[str], list[Scene]]:
    """``n`` shapes corpus images (uint8 N×3×size×size), captions and scenes."""
    import numpy as np

    from genloop.data.shapes import generate

    rows = list(generate(n, seed=seed, size=size, split=split, max_objects=max_objects))  # type: ignore[arg-type]
    images = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 3, 1, 2).contiguous()
    return images, [r[1] for r in rows], [r[2] for r in rows]


# ------------------------------------------------------------------------------- suite


def is_shapes_corpus(captions: Sequence[str]) -> bool:
    """Whether every caption parses as a shapes corpus caption."""
    from genloop.data.shapes import parse_caption

    return bool(captions) and all(parse_caption(c) is not None for c in captions)


def evaluate_clip(
    model: Any,
    tok: PreTrainedTokenizerBase,
    images: Tensor,
    captions: Sequence[str],
    *,
    seed: int = 0,
    labels: Tensor | None = None,
    classes: Sequence[str] = (),
    attribute_images: int = ATTRIBUTE_IMAGES,
    progress: Callable[[str], None] | None = None,
) -> SuiteResult:
    """The ``clip`` suite on aligned test images and captions (seen combinations), plus
    held-out corpus images when the captions are the shapes corpus'."""

    def step(what: str) -> None:
        if progress is not None:
            progress(what)

    metrics: dict[str, float] = {}
    per_sample: dict[str, list[float]] = {}
    step("retrieval and CLIP score")
    recall = retrieval_recall(model, tok, images, captions)
    metrics.update({f"{k}_seen": v for k, v in recall.items()})
    scores = clip_scores(model, tok, images, captions)
    metrics["clip_score_seen"] = float(scores.mean())
    per_sample["clip_score_seen"] = scores.tolist()
    if labels is not None and classes and int((labels >= 0).sum()) > 0:
        keep = labels >= 0
        metrics["zero_shot_accuracy"] = zero_shot_accuracy(
            model, tok, images[keep], labels[keep], list(classes)
        )
    shapes = is_shapes_corpus(list(captions))
    if shapes:
        size = int(images.shape[-1])
        step("held-out combinations")
        held, held_captions, _ = corpus_images(
            len(captions), seed + HELD_OUT_SEED, size, "held_out", 3
        )
        recall = retrieval_recall(model, tok, held, held_captions)
        metrics.update({f"{k}_held_out": v for k, v in recall.items()})
        scores = clip_scores(model, tok, held, held_captions)
        metrics["clip_score_held_out"] = float(scores.mean())
        per_sample["clip_score_held_out"] = scores.tolist()
        step("attribute zero-shot")
        for split in ("seen", "held_out"):
            imgs, _, scenes = corpus_images(
                attribute_images, seed + HELD_OUT_SEED + 1, size, split, 1
            )
            found = attribute_zero_shot(model, tok, imgs, scenes)
            for key in ("colour", "shape", "joint", "exact"):
                metrics[f"zero_shot_{key}_{split}"] = found[key]
            per_sample[f"zero_shot_joint_{split}"] = found["joint_hits"]
    samples = [{"caption": c} for c in list(captions)[:5]]
    settings = {
        "pairs": len(captions),
        "ks": list(KS),
        "seed": seed,
        "shapes_corpus": shapes,
        "attribute_images": attribute_images if shapes else 0,
        "retrieval_match": "same caption text",
    }
    return SuiteResult("clip", metrics, per_sample, samples, settings)


def run_clip_suites(
    ws: Workspace,
    info: ModelVersionInfo,
    model_dir: Path,
    dataset: DatasetVersionInfo,
    data_dir: Path,
    suites: list[str],
    cfg: EvalConfig,
    device: str,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[SuiteResult]:
    """Run the ``clip`` suite on CLIP model version ``info`` against ``dataset``'s
    ``cfg.split`` (at most ``cfg.max_samples`` pairs)."""
    from genloop.data.images import caption_split, image_split
    from genloop.models.clip import load_clip

    results: list[SuiteResult] = []
    for i, suite in enumerate(suites, 1):
        if suite != "clip":
            raise GenloopError(f"{info.ref} is a clip model; it runs the clip suite, not {suite}")

        def step(what: str, i: int = i) -> None:
            if progress is not None:
                progress(f"clip: {what}", i, len(suites))

        step("loading")
        found = caption_split(data_dir, cfg.split)
        if found is None or found[0].shape[0] < 2:
            raise GenloopError(
                f"dataset {dataset.ref} has no captioned {cfg.split} split (2 pairs at least) "
                "to evaluate a clip model on; choose another with --set eval.split=val"
            )
        images, captions = found
        split = image_split(data_dir, cfg.split)
        labels, classes = (split[1], split[2]) if split is not None else (None, [])
        n = images.shape[0] if cfg.max_samples is None else min(cfg.max_samples, images.shape[0])
        model, tok = load_clip(model_dir, device=device)
        torch.manual_seed(cfg.seed)
        result = evaluate_clip(
            model,
            tok,
            images[:n],
            captions[:n],
            seed=cfg.seed,
            labels=None if labels is None else labels[:n],
            classes=classes,
            progress=step,
        )
        result.settings.update({"split": cfg.split, "dataset": dataset.ref})
        results.append(result)
    return results
