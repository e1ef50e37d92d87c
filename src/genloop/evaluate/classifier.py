"""A small image classifier trained on a dataset: the default feature extractor of the
image metrics, the judge of conditional samples, and the probe of augmentation.

FID/KID/IS need a network that maps images to features and class probabilities. The
usual one, InceptionV3 trained on ImageNet, needs weights from the internet and says
little about 8×8 digits, so by default genloop trains this classifier on the dataset's own
training split, stores it in the artifact store keyed by the dataset version
(``extractors/<dataset>/<version>/classifier-v1``) and reuses it on every later call: the
same dataset version, the same extractor, comparable numbers. Its id
(``classifier:<dataset ref>:<sha256 of its weights, 12 hex>``) goes into every report.

    x (B, C, H, W) in [-1, 1] → conv 3×3 → [conv stride 2]… → flatten → linear → ReLU
      → features φ(x) (B, 128) → linear → logits (B, K)

Training: AdamW, batches drawn with a seeded generator, random 1-pixel shifts (so
samples that sit a pixel off are still recognised); initialisation seeded without
touching torch's global generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genloop.errors import ConflictError, GenloopError
from genloop.models.image_io import down_levels

if TYPE_CHECKING:
    from genloop.workspace.datasets import DatasetVersionInfo
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

FORMAT = "genloop-classifier"
VERSION = 1  # bump when the architecture or its training changes: a new key, a new extractor
FEATURES = 128
STEPS = 600
BATCH = 64
LR = 2e-3
META_FILE = "extractor.json"


class SmallClassifier(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        size, ch = int(config["image_size"]), int(config["channels"])
        k, width = int(config["num_classes"]), int(config.get("width", 32))
        levels, final = down_levels(size)
        layers: list[nn.Module] = [nn.Conv2d(ch, width, 3, padding=1), nn.ReLU()]
        w = width
        for _ in range(levels):
            layers += [nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.ReLU()]
            w *= 2
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(w * final * final, FEATURES)
        self.head = nn.Linear(FEATURES, k)

    def features(self, x: Tensor) -> Tensor:
        """φ(x) (B, 128) of images in [-1, 1]."""
        return F.relu(self.embed(self.body(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x))
        return out


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Random shifts of up to one pixel (edge-replicated), per image."""
    from genloop.data.images import augment

    return augment(x, g, flip=False, crop_pad=1, jitter=0.0)


def train_classifier(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    steps: int = STEPS,
    batch_size: int = BATCH,
) -> SmallClassifier:
    """A classifier trained on uint8 ``images`` (N, C, H, W) with ``labels`` (N,), from
    ``seed`` alone (the same inputs and seed give the same weights on one machine)."""
    from genloop.data.images import normalize

    keep = labels >= 0
    images, labels = images[keep], labels[keep]
    if images.shape[0] < 2:
        raise GenloopError("training the image classifier needs at least 2 labelled images")
    config = {
        "image_size": int(images.shape[-1]),
        "channels": int(images.shape[1]),
        "num_classes": num_classes,
        "width": 32,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    data = normalize(images)
    model.train()
    for step in range(steps):
        lr = LR * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi))).item()
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        loss = F.cross_entropy(model(_shift(data[idx], g)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: SmallClassifier, images: Tensor, batch: int = 1024) -> Tensor:
    """Predicted class ids (N,) of uint8 images."""
    from genloop.data.images import normalize

    out = [model(normalize(images[i : i + batch])).argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model: SmallClassifier, images: Tensor, labels: Tensor) -> float:
    keep = labels >= 0
    if int(keep.sum()) == 0:
        return float("nan")
    return float((predict(model, images[keep]) == labels[keep]).float().mean())


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def store_key(dataset: DatasetVersionInfo) -> str:
    return f"extractors/{dataset.name}/{dataset.version}/classifier-v{VERSION}"


def dataset_classifier(
    ws: Workspace, dataset: DatasetVersionInfo, data_dir: Path
) -> tuple[SmallClassifier, dict[str, Any]]:
    """The classifier of this dataset version: loaded from the store, or trained on its
    training split (scored on its test split, else val) and stored. Returns it and its
    description (id, dataset, accuracy, artifact key)."""
    from genloop.data.images import image_split, require_images
    from genloop.models.image_io import load_state, read_config, save_module_dir

    key = store_key(dataset)
    if not ws.store.exists(key):
        images, labels, classes = require_images(data_dir, f"dataset {dataset.ref}")
        if int((labels >= 0).sum()) == 0:
            raise GenloopError(
                f"dataset {dataset.ref} has no labels, so genloop cannot train its feature "
                "extractor; give eval.inception_weights (a local InceptionV3 file) instead"
            )
        model = train_classifier(images, labels, len(classes), seed=0)
        held = image_split(data_dir, "test") or image_split(data_dir, "val")
        acc = accuracy(model, held[0], held[1]) if held is not None else float("nan")
        meta = {
            "kind": "classifier",
            "id": f"classifier:{dataset.ref}:{weights_digest(model)[:12]}",
            "dataset": dataset.ref,
            "classes": classes,
            "heldout_accuracy": acc if acc == acc else None,  # NaN → null
            "train_images": int(images.shape[0]),
            "steps": STEPS,
            "version": VERSION,
            "artifact": key,
        }
        try:
            with ws.store.writer(key) as staging:
                save_module_dir(model, staging / "model", FORMAT, model.config)
                (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
            log.info(
                "trained the image classifier of %s (held-out accuracy %.3f)", dataset.ref, acc
            )
            return model, meta
        except ConflictError:  # another process stored it meanwhile: use theirs
            pass
    path = ws.store.open_verified(key)
    model = SmallClassifier(read_config(path / "model", FORMAT))
    load_state(model, path / "model")
    meta = json.loads((path / META_FILE).read_text("utf-8"))
    return model.eval().requires_grad_(False), meta
