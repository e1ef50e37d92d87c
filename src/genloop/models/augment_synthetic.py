"""``genloop augment``: a class-conditional image model writes a synthetic labelled dataset.

The version holds ``per_class`` generated images of every class, as the training split of
an image dataset (``images/train/images.safetensors`` + ``classes.json``, the layout
``genloop.data.images`` writes), so it trains models like any prepared dataset, and
``genloop eval MODEL --suite augment`` measures what it adds to the real data.

Its lineage names the model version (``generated_by``) and the real dataset the model was
trained on; its content hash covers the model's files, ``per_class`` and ``seed``, so the
same call finds the version it wrote before instead of writing another.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from genloop.errors import GenloopError
from genloop.workspace.datasets import DatasetVersionInfo
from genloop.workspace.workspace import Workspace

FORMAT = "genloop-synthetic-images"
FORMAT_VERSION = 1
MAX_PER_CLASS = 100_000
ProgressFn = Callable[[int, int], None]  # (images done, images in all)


def synthetic_dataset(
    ws: Workspace,
    ref: str,
    per_class: int,
    *,
    name: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 256,
    progress: ProgressFn | None = None,
) -> tuple[DatasetVersionInfo, bool]:
    """Generate ``per_class`` images of every class with model ``ref`` and publish them as
    the next version of dataset ``name`` (default ``<model name>-synthetic``); returns it
    and whether it is new (False: the same model, count and seed wrote it before)."""
    import torch

    from genloop.models.image_generation import load_image_generator
    from genloop.workspace import registry
    from genloop.workspace.datasets import find_by_hash, register_dataset_version
    from genloop.workspace.manifest import read_manifest
    from genloop.workspace.refs import check_name

    if not 1 <= per_class <= MAX_PER_CLASS:
        raise GenloopError(f"--per-class must be between 1 and {MAX_PER_CLASS}, not {per_class}")
    if not 0 <= seed < 2**63:
        raise GenloopError(f"seed must be between 0 and 2^63 - 1, not {seed}")
    info = registry.resolve(ws, ref)
    if info.family not in ("vae", "gan", "diffusion"):
        raise GenloopError(f"{info.ref} is a {info.family} model; augment needs an image model")
    name = check_name(name or f"{info.name}-synthetic")
    model_dir = ws.store.open_verified(info.artifact)
    manifest = read_manifest(model_dir)
    h = hashlib.sha256(f"{FORMAT}-v{FORMAT_VERSION}\n".encode())
    h.update(json.dumps({"per_class": per_class, "seed": seed}, sort_keys=True).encode())
    h.update(json.dumps(manifest, sort_keys=True).encode())  # the model's files, by digest
    digest = h.hexdigest()
    existing = find_by_hash(ws, name, digest)
    if existing is not None:
        return existing, False

    gen = load_image_generator(model_dir, device=device)
    if not gen.conditional:
        raise GenloopError(
            f"{info.ref} is unconditional, so its images have no labels; train a "
            "class-conditional model (model.num_classes) to write a labelled dataset"
        )
    classes = gen.class_names
    total = per_class * len(classes)
    labels = [k for k in range(len(classes)) for _ in range(per_class)]
    started = time.perf_counter()
    parts = []
    # one generator stream for the whole set, in batches (as ImageGenerator.sample does)
    chunk = max(batch_size, 1)
    for i in range(0, total, chunk):
        part_labels = labels[i : i + chunk]
        part_seed = int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1
        parts.append(gen.sample(part_labels, len(part_labels), part_seed, batch_size))
        if progress is not None:
            progress(min(i + chunk, total), total)
    images = torch.cat(parts)
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    seconds = round(time.perf_counter() - started, 3)
    stats = {
        "splits": {"train": {"documents": total, "bytes": int(images.numel())}},
        "documents": total,
        "per_class": per_class,
        "classes": len(classes),
        "seconds": seconds,
        "synthetic": True,
    }
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": info.ref,
        "per_class": per_class,
        "seed": seed,
        "image_shape": list(images.shape[1:]),
    }
    lineage = {
        "generated_by": {"model": info.ref, "model_version_id": info.id, "family": info.family},
        "real_dataset_version_id": info.dataset_version_id,
    }

    def write(staging: Path) -> None:
        from safetensors.torch import save_file

        from genloop.data.images import CLASSES_FILE, IMAGES_FILE

        split = staging / "images" / "train"
        split.mkdir(parents=True)
        (split / CLASSES_FILE).write_text(json.dumps(classes, ensure_ascii=False) + "\n")
        save_file(
            {"images": images.contiguous(), "labels": label_tensor},
            str(split / IMAGES_FILE),
            metadata={"format": "genloop-images"},
        )
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "card.md").write_text(
            f"# {name}\n\nSynthetic images: {per_class} per class × {len(classes)} classes "
            f"= {total}, generated by {info.ref} ({info.family}) from seed {seed}.\n"
            "Only a training split: evaluate on real data.\n"
        )

    version = register_dataset_version(
        ws, name, digest, write, kind="images", config=config, stats=stats, lineage=lineage
    )
    return version, True
