"""Image suites: FID, KID and Inception Score of an image model, and the effect of its
synthetic data on a downstream classifier.

``image`` (suite) — the model's samples against the dataset's training images:

- ``fid``, ``kid`` (mean; ``kid_std``), ``is`` (``is_std``) through torchmetrics, on
  ``eval.image_samples`` generated and as many real images (the training split, a seeded
  subset when it is larger);
- ``fid_untrained``, ``kid_untrained``, ``is_untrained``: the same for the same
  architecture freshly initialised from the training seed, so every report shows how far
  training moved the model;
- ``fid_real_heldout``: the held-out real images (test + val) against the same reference,
  the floor a perfect model would reach at that sample size;
- ``conditional_accuracy`` (class-conditional models): the share of samples the
  dataset's classifier assigns to the class they were generated for.

The feature extractor is the dataset's own small classifier (``evaluate/classifier.py``),
or InceptionV3 from the local safetensors file ``eval.inception_weights`` (nothing is ever
downloaded). The report names the extractor (``settings.extractor.id``), and metric names
carry its kind (``fid`` for the classifier, ``fid_inception`` for InceptionV3), so scores
from different extractors are never compared with each other.

``augment`` (suite) — the synthetic dataset ``genloop augment`` wrote from this model:
a classifier trained on the real training split and one trained on real + synthetic, from
the same seeds, both scored on the real test split: ``accuracy_real``,
``accuracy_augmented``, ``accuracy_delta``.

Features are computed once per image set and handed to torchmetrics through a
pass-through module, so FID, KID and IS share one forward pass of the extractor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.evaluate.features import Extractor
from genloop.evaluate.results import SuiteResult

if TYPE_CHECKING:
    from genloop.config import EvalConfig
    from genloop.evaluate.classifier import SmallClassifier
    from genloop.models.image_generation import ImageGenerator
    from genloop.workspace.datasets import DatasetVersionInfo
    from genloop.workspace.registry import ModelVersionInfo
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

IMAGE_SUITES = ("image", "augment")
KID_SUBSETS = 50
IS_SPLITS = 10
AUGMENT_SEEDS = (0, 1, 2)
FEATURE_BATCH = 500
ProgressFn = Callable[[str], None]


def classifier_extractor(model: SmallClassifier, meta: dict[str, Any]) -> Extractor:
    from genloop.data.images import normalize

    def features(images: Tensor) -> Tensor:
        return model.features(normalize(images))

    def logits(images: Tensor) -> Tensor:
        out: Tensor = model(normalize(images))
        return out

    return Extractor(str(meta["id"]), "classifier", features, logits, meta)


def make_extractor(
    ws: Workspace, dataset: DatasetVersionInfo, data_dir: Path, inception_weights: Path | None
) -> Extractor:
    """InceptionV3 from ``inception_weights`` when given, else the dataset's classifier."""
    if inception_weights is not None:
        from genloop.evaluate.inception import inception_extractor

        return inception_extractor(inception_weights)
    from genloop.evaluate.classifier import dataset_classifier

    return classifier_extractor(*dataset_classifier(ws, dataset, data_dir))


# ------------------------------------------------------------------------------ metrics


class _Precomputed(nn.Module):
    """Hands already-computed features to torchmetrics (its ``feature`` module)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    out = [fn(images[i : i + FEATURE_BATCH]).double() for i in range(0, len(images), FEATURE_BATCH)]
    return torch.cat(out)


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), normalize=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def image_scores(
    real: Tensor, fake: Tensor, extractor: Extractor, seed: int = 0
) -> dict[str, float]:
    """FID, KID (mean, std) and IS (mean, std) of uint8 ``fake`` against uint8 ``real``.

    KID and IS draw random subsets and splits; they come from ``seed`` (torch's global
    generator is left as it was).
    """
    import warnings

    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise GenloopError("image metrics need at least 2 real and 2 generated images")
    f_real = _batched(extractor.features, real)
    f_fake = _batched(extractor.features, fake)
    logits = _batched(extractor.logits, fake)
    s = extractor.suffix
    out = {f"fid{s}": fid_from_features(f_real, f_fake)}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        torch.manual_seed(seed)
        size = max(2, min(1000, len(real) // 2, len(fake) // 2))  # subsets that differ
        kid = KernelInceptionDistance(
            feature=_Precomputed(f_real.shape[1]), subsets=KID_SUBSETS, subset_size=size
        )
        kid.update(f_real, real=True)
        kid.update(f_fake, real=False)
        kid_mean, kid_std = kid.compute()
        splits = min(IS_SPLITS, len(fake))
        inception = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
        inception.update(logits)
        is_mean, is_std = inception.compute()
    out |= {
        f"kid{s}": float(kid_mean),
        f"kid{s}_std": float(kid_std),
        f"is{s}": float(is_mean),
        f"is{s}_std": float(is_std),
    }
    return out


def reference_images(data_dir: Path, n: int, seed: int) -> Tensor:
    """Up to ``n`` training images (a seeded subset when there are more), uint8."""
    from genloop.data.images import require_images

    images, _, _ = require_images(data_dir)
    if len(images) <= n:
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:n]]


def heldout_images(data_dir: Path) -> tuple[Tensor, Tensor] | None:
    from genloop.data.images import image_split

    parts = [p for p in (image_split(data_dir, "test"), image_split(data_dir, "val")) if p]
    if not parts:
        return None
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def untrained_like(gen: ImageGenerator, seed: int) -> ImageGenerator:
    """The same architecture, freshly initialised from ``seed`` (a latent diffusion model
    keeps its trained VAE: only the UNet is what training changes)."""
    from genloop.models.family import get_family

    config = dict(getattr(gen.model, "config", {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if gen.family == "diffusion":
            from genloop.models.diffusion import DiffusionModel

            model: nn.Module = DiffusionModel(config, getattr(gen.model, "vae", None))
        else:
            model = get_family(gen.family).build(config)
    device = next(gen.model.parameters()).device
    model.to(device).eval().requires_grad_(False)
    return replace(gen, model=model)


def evaluate_images(
    gen: ImageGenerator,
    data_dir: Path,
    extractor: Extractor,
    *,
    n: int,
    seed: int,
    train_seed: int,
    judge: SmallClassifier | None,
    classes: list[str],
    progress: ProgressFn | None = None,
) -> SuiteResult:
    """The ``image`` suite for a loaded model (see the module docstring)."""
    from genloop.evaluate.classifier import predict

    def step(what: str) -> None:
        if progress is not None:
            progress(what)

    real = reference_images(data_dir, n, seed)
    labels = gen.labels_for(None, n)  # conditional: every class in turn
    step(f"sampling {n} images")
    started = time.perf_counter()
    fake = gen.sample(labels, n, seed)
    sample_seconds = time.perf_counter() - started
    step("scoring")
    metrics = image_scores(real, fake, extractor, seed)
    step(f"sampling {n} images from the untrained model")
    baseline = untrained_like(gen, train_seed).sample(labels, n, seed)
    untrained = image_scores(real, baseline, extractor, seed)
    s = extractor.suffix
    for key in (f"fid{s}", f"kid{s}", f"is{s}"):
        metrics[f"{key}_untrained"] = untrained[key]
    held = heldout_images(data_dir)
    if held is not None and len(held[0]) >= 2:
        metrics[f"fid{s}_real_heldout"] = image_scores(real, held[0], extractor, seed)[f"fid{s}"]

    per_sample: dict[str, list[float]] = {}
    samples: list[dict[str, Any]] = []
    if gen.conditional and judge is not None and labels is not None:
        if gen.class_names != classes:
            raise GenloopError(
                f"the model's classes ({', '.join(gen.class_names[:10])}) are not the "
                f"dataset's ({', '.join(classes[:10])})"
            )
        predicted = predict(judge, fake)
        wanted = torch.tensor(labels)
        correct = (predicted == wanted).float()
        metrics["conditional_accuracy"] = float(correct.mean())
        per_sample["conditional_accuracy"] = correct.tolist()
        for k, name in enumerate(gen.class_names):
            mine = wanted == k
            if int(mine.sum()) == 0:
                continue
            counts = torch.bincount(predicted[mine], minlength=len(classes))
            top = int(counts.argmax())
            samples.append(
                {
                    "class": name,
                    "samples": int(mine.sum()),
                    "accuracy": round(float(correct[mine].mean()), 4),
                    "most_often_seen_as": classes[top],
                }
            )
    settings = {
        "extractor": {k: v for k, v in extractor.meta.items() if k != "classes"}
        | {"id": extractor.id, "kind": extractor.kind},
        "generated": n,
        "real": len(real),
        "real_split": "train",
        "heldout_real": None if held is None else len(held[0]),
        "seed": seed,
        "untrained_seed": train_seed,
        "family": gen.family,
        "conditional": gen.conditional,
        "labels": "every class in turn" if gen.conditional else None,
        "sample_seconds": round(sample_seconds, 3),
    }
    return SuiteResult("image", metrics, per_sample, samples, settings)


# ------------------------------------------------------------------------ augmentation


def synthetic_version_of(ws: Workspace, info: ModelVersionInfo) -> DatasetVersionInfo | None:
    """The newest dataset version ``genloop augment`` wrote from model version ``info``."""
    from genloop.workspace.datasets import list_dataset_versions

    made = [
        d
        for d in list_dataset_versions(ws)
        if (d.lineage.get("generated_by") or {}).get("model_version_id") == info.id
    ]
    return max(made, key=lambda d: d.created_at) if made else None


def evaluate_augmentation(
    ws: Workspace,
    info: ModelVersionInfo,
    data_dir: Path,
    dataset: DatasetVersionInfo,
    *,
    seeds: tuple[int, ...] = AUGMENT_SEEDS,
    steps: int | None = None,
    progress: ProgressFn | None = None,
) -> SuiteResult:
    """The ``augment`` suite: real vs real + synthetic training (``steps`` each, default
    the extractor's), scored on real test data."""
    from genloop.evaluate.classifier import STEPS, accuracy, train_classifier

    steps = steps or STEPS
    from genloop.data.images import image_split, require_images

    synthetic = synthetic_version_of(ws, info)
    if synthetic is None:
        raise GenloopError(
            f"{info.ref} has written no synthetic dataset: run 'genloop augment images {info.ref} "
            "--per-class N' first"
        )
    images, labels, classes = require_images(data_dir, f"dataset {dataset.ref}")
    test = image_split(data_dir, "test") or image_split(data_dir, "val")
    if test is None or len(test[0]) == 0:
        raise GenloopError(f"dataset {dataset.ref} has no test or val split to score on")
    s_images, s_labels, s_classes = require_images(
        ws.store.open_verified(synthetic.artifact), f"dataset {synthetic.ref}"
    )
    if s_classes != classes:
        raise GenloopError(
            f"the synthetic dataset {synthetic.ref} has classes {s_classes[:10]}, the real one "
            f"{dataset.ref} {classes[:10]}"
        )
    if s_images.shape[1:] != images.shape[1:]:
        raise GenloopError(
            f"synthetic images are {tuple(s_images.shape[1:])}, real ones "
            f"{tuple(images.shape[1:])} (C, H, W)"
        )
    both_images, both_labels = torch.cat([images, s_images]), torch.cat([labels, s_labels])
    real_acc, aug_acc = [], []
    for seed in seeds:
        if progress is not None:
            progress(f"classifiers, seed {seed}")
        model = train_classifier(images, labels, len(classes), seed=seed, steps=steps)
        real_acc.append(accuracy(model, test[0], test[1]))
        model = train_classifier(both_images, both_labels, len(classes), seed=seed, steps=steps)
        aug_acc.append(accuracy(model, test[0], test[1]))
    deltas = [a - r for a, r in zip(aug_acc, real_acc, strict=True)]
    metrics = {
        "accuracy_real": sum(real_acc) / len(real_acc),
        "accuracy_augmented": sum(aug_acc) / len(aug_acc),
        "accuracy_delta": sum(deltas) / len(deltas),
        "synthetic_images": float(len(s_images)),
    }
    samples = [
        {"seed": s, "accuracy_real": round(r, 4), "accuracy_augmented": round(a, 4)}
        for s, r, a in zip(seeds, real_acc, aug_acc, strict=True)
    ]
    settings = {
        "synthetic_dataset": synthetic.ref,
        "real_dataset": dataset.ref,
        "real_train_images": len(images),
        "test_images": len(test[0]),
        "test_split": "test" if image_split(data_dir, "test") is not None else "val",
        "seeds": list(seeds),
        "classifier_steps": steps,
    }
    return SuiteResult("augment", metrics, {"accuracy_delta": deltas}, samples, settings)


# ------------------------------------------------------------------------- entry point


def run_image_suites(
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
    """Run the image suites on model version ``info`` against ``dataset``."""
    from genloop.data.images import require_images
    from genloop.evaluate.classifier import dataset_classifier
    from genloop.models.image_generation import load_image_generator

    results: list[SuiteResult] = []
    for i, suite in enumerate(suites, 1):

        def step(what: str, suite: str = suite, i: int = i) -> None:
            if progress is not None:
                progress(f"{suite}: {what}", i, len(suites))

        step("starting")
        torch.manual_seed(cfg.seed)
        if suite == "augment":
            results.append(evaluate_augmentation(ws, info, data_dir, dataset, progress=step))
            continue
        _, labels, classes = require_images(data_dir, f"dataset {dataset.ref}")
        gen = load_image_generator(model_dir, device=device)
        judge = None
        if int((labels >= 0).sum()) > 0:
            judge, meta = dataset_classifier(ws, dataset, data_dir)
        extractor = (
            classifier_extractor(judge, meta)
            if judge is not None and cfg.inception_weights is None
            else make_extractor(ws, dataset, data_dir, cfg.inception_weights)
        )
        train_seed = (info.config.get("train") or {}).get("seed", 0)
        results.append(
            evaluate_images(
                gen,
                data_dir,
                extractor,
                n=cfg.image_samples,
                seed=cfg.seed,
                train_seed=int(train_seed) if isinstance(train_seed, int) else 0,
                judge=judge,
                classes=classes,
                progress=step,
            )
        )
    return results
