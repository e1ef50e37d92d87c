"""The ``t2i`` suite: does a text-to-image model draw what its prompts say?

    1. prompts   seen: distinct captions of the dataset's eval split (``eval.t2i_prompts``);
                 held-out: captions of combinations never in training (the shapes
                 corpus's held-out colour-shape pairs), when the dataset is that corpus
    2. images    ``eval.t2i_images_per_prompt`` per prompt, seeded from ``eval.seed``
    3. judge     compositional accuracy: an attribute classifier trained on real corpus
                 images (``evaluate/compositional.py``) reads each image's objects, colour,
                 shape and size per position, against its caption (shapes datasets only)
    4. CLIP      CLIP score of each image with its prompt, and FID on CLIP image features
                 against the eval split's real images, by the CLIP model the text encoder
                 came from (or ``eval.clip_model``); skipped when there is none
    5. report    every metric for ``_seen`` and ``_held_out`` prompts, and a sample grid
                 per prompt (the first ``FIGURES`` of each group)

Every metric can be a release-gate rule (``compositional_accuracy_held_out min 0.6``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import GenloopError
from genloop.evaluate.results import SuiteResult

if TYPE_CHECKING:
    from torch import Tensor

    from genloop.config import EvalConfig
    from genloop.models.text_to_image import TextToImage
    from genloop.workspace.datasets import DatasetVersionInfo
    from genloop.workspace.registry import ModelVersionInfo
    from genloop.workspace.workspace import Workspace

FIGURES = 4  # sample grids per group of prompts in the report
CLIP_BATCH = 256

ProgressFn = Callable[[str, int, int], None]


def run_t2i_suite(
    ws: Workspace,
    info: ModelVersionInfo,
    model_dir: Path,
    ds: DatasetVersionInfo,
    data_dir: Path,
    cfg: EvalConfig,
    device: str,
    progress: ProgressFn | None = None,
) -> SuiteResult:
    """The ``t2i`` suite of model version ``info`` on dataset version ``ds``."""
    from genloop.data.images import caption_split
    from genloop.models.text_to_image import load_text_to_image

    if progress is not None:
        progress("t2i", 1, 1)
    split = caption_split(data_dir, cfg.split)
    if split is None or not split[1]:
        raise GenloopError(
            f"dataset {ds.ref} has no captions in its {cfg.split} split: the t2i suite draws "
            "its prompts from them"
        )
    real, captions = split
    model = load_text_to_image(model_dir, device=device)
    groups = prompt_groups(captions, cfg.t2i_prompts, cfg.seed)
    clip = _clip_for(ws, info, cfg.clip_model, device)
    judge = _judge(ws, model, groups)
    return evaluate_text_to_image(
        model, groups, real, cfg, judge=judge, clip=clip, settings={"dataset_split": cfg.split}
    )


def prompt_groups(captions: Sequence[str], n: int, seed: int) -> dict[str, list[str]]:
    """``seen``: up to ``n`` distinct captions, in order; ``held_out``: as many captions of
    held-out combinations when every caption is a shapes-corpus caption (else none)."""
    from genloop.data.shapes import caption, parse_caption, random_scene

    seen = list(dict.fromkeys(captions))[:n]
    groups = {"seen": seen}
    if all(parse_caption(c) is not None for c in seen):
        import numpy as np

        rng = np.random.default_rng(seed)
        held: dict[str, None] = {}
        while len(held) < len(seen):
            held[caption(random_scene(rng, split="held_out"))] = None
        groups["held_out"] = list(held)
    return groups


def evaluate_text_to_image(
    model: TextToImage,
    groups: dict[str, list[str]],
    real: Tensor,
    cfg: EvalConfig,
    *,
    judge: Any | None,
    clip: tuple[Any, Any] | None,
    settings: dict[str, Any] | None = None,
) -> SuiteResult:
    """Draw ``cfg.t2i_images_per_prompt`` images per prompt of each group and score them
    (see the module docstring); ``real`` are uint8 images of the evaluated split."""
    from genloop.evaluate.clip_metrics import clip_scores
    from genloop.evaluate.compositional import attribute_accuracy
    from genloop.evaluate.image import fid_from_features

    k = cfg.t2i_images_per_prompt
    metrics: dict[str, float] = {}
    per_sample: dict[str, list[float]] = {}
    samples: list[dict[str, Any]] = []
    figures: dict[str, bytes] = {}
    seconds = 0.0
    drawn = 0
    for group, prompts in groups.items():
        if not prompts:
            continue
        started = time.perf_counter()
        images = model.generate(prompts, n=k, seed=cfg.seed, steps=cfg.t2i_steps)  # prompt-major
        seconds += time.perf_counter() - started
        drawn += images.shape[0]
        texts = [p for p in prompts for _ in range(k)]
        if judge is not None:
            parts = attribute_accuracy(judge, images, texts)
            for name, value in parts.items():
                key = "compositional_accuracy" if name == "exact" else f"{name}_accuracy"
                metrics[f"{key}_{group}"] = value
            per_sample[f"compositional_accuracy_{group}"] = _exact_each(judge, images, texts)
        if clip is not None:
            scores = _batched_clip_scores(clip_scores, clip, images, texts)
            metrics[f"clip_score_{group}"] = float(scores.mean())
            per_sample[f"clip_score_{group}"] = scores.tolist()
            if group == "seen":
                metrics["fid_clip"] = fid_from_features(
                    _features(clip, real[: max(len(texts), 2)]), _features(clip, images)
                )
        for i, prompt in enumerate(prompts):
            row: dict[str, Any] = {"group": group, "prompt": prompt}
            if f"compositional_accuracy_{group}" in per_sample:
                hits = per_sample[f"compositional_accuracy_{group}"][i * k : (i + 1) * k]
                row["judged_right"] = f"{int(sum(hits))}/{k}"
            samples.append(row)
            if i < FIGURES:
                figures[f"{group}: {prompt}"] = _grid_png(images[i * k : (i + 1) * k])
    settings = {
        **(settings or {}),
        "prompts": {g: len(p) for g, p in groups.items()},
        "images_per_prompt": k,
        "steps": cfg.t2i_steps or model.config["sample_steps"],
        "sampler": model.config["sampler"],
        "guidance_scale": model.config["guidance_scale"],
        "seed": cfg.seed,
        "judge": judge is not None,
        "clip": clip is not None,
        "images_per_s": round(drawn / seconds, 3) if seconds else None,
    }
    return SuiteResult("t2i", metrics, per_sample, samples, settings, figures)


def _exact_each(judge: Any, images: Tensor, texts: Sequence[str]) -> list[float]:
    from genloop.evaluate.compositional import caption_scenes

    seen = judge.predict(images)
    return [float(want == got) for want, got in zip(caption_scenes(texts), seen, strict=True)]


def _batched_clip_scores(fn: Any, clip: tuple[Any, Any], images: Tensor, texts: list[str]) -> Any:
    import torch

    model, tok = clip
    parts = [
        fn(model, tok, images[i : i + CLIP_BATCH], texts[i : i + CLIP_BATCH])
        for i in range(0, len(texts), CLIP_BATCH)
    ]
    return torch.cat(parts)


def _features(clip: tuple[Any, Any], images: Tensor) -> Tensor:
    import torch

    from genloop.models.clip import image_features

    model = clip[0]
    with torch.inference_mode():
        return torch.cat(
            [
                image_features(model, images[i : i + CLIP_BATCH])
                for i in range(0, len(images), CLIP_BATCH)
            ]
        )


def _grid_png(images: Tensor) -> bytes:
    from genloop.models.image_generation import make_grid, to_pil

    buf = io.BytesIO()
    make_grid(to_pil(images)).save(buf, format="PNG")
    return buf.getvalue()


def _clip_for(
    ws: Workspace, info: ModelVersionInfo, ref: str | None, device: str
) -> tuple[Any, Any] | None:
    """The CLIP model that scores: ``eval.clip_model``, else the clip model version the
    text encoder came from (its lineage), else none."""
    from genloop.models.clip import load_clip
    from genloop.workspace import registry

    if ref is None:
        recorded = (info.config.get("model") or {}).get("text_encoder")
        if not isinstance(recorded, str):
            return None
        try:
            source = registry.resolve(ws, recorded)
        except GenloopError:
            return None  # a folder, or a version since deleted: no CLIP to score with
        if source.family != "clip":
            return None
    else:
        source = registry.resolve(ws, ref)
        if source.family != "clip":
            raise GenloopError(f"eval.clip_model {ref!r} is not a clip model ({source.family})")
    return load_clip(ws.store.open_verified(source.artifact), device=device)


def _judge(ws: Workspace, model: TextToImage, groups: dict[str, list[str]]) -> Any | None:
    """The shapes attribute judge for the model's image size, when the prompts are
    shapes-corpus captions (``prompt_groups`` made a held-out group)."""
    from genloop.evaluate.compositional import load_or_train_judge

    if "held_out" not in groups:
        return None
    return load_or_train_judge(ws, int(model.image_size))
