"""The image objectives (``vae``, ``gan``, ``diffusion``): image batches for the one loop.

An image dataset version holds ``images/<split>/images.safetensors`` (uint8 N×C×H×W and
int64 labels) and ``classes.json`` (see ``genloop.data.images``). The model is sized by the
dataset: its image side, channels and (for ``model.num_classes``) its class list.

A training batch is a dict of tensors on the device::

    images   (B, C, H, W) float in [-1, 1], after train.augment (flip, crop, jitter)
    labels   (B,) long class ids (-1: unlabelled; used by conditional models)
    …        the family's random inputs: eps (VAE), z (GAN), noise/timesteps/drop (diffusion)

Every random number of micro-step ``s`` (augmentation and the family's inputs) comes from
a generator seeded by ``(train.seed, s, rank)``, so a batch depends on nothing but its
position: a resumed run sees exactly the batches the uninterrupted one saw. Validation
batches are fixed (seeded by their index), so validation losses are comparable over time.

The loss is the family's (``Family.loss``); the count the loop sums as "tokens" is the
number of images. After each optimizer step :meth:`ImageObjective.after_step` moves the
GAN's EMA generator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from genloop.config import GenloopConfig
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

IMAGE_OBJECTIVES = ("vae", "gan", "diffusion")
VAL_STREAM = 1 << 20  # the "rank" of validation batches' generators: apart from training's
Batch = dict[str, "Tensor"]
Draw = Callable[[int, "torch.Generator"], dict[str, "Tensor"]]


def batch_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for micro-step ``step`` on ``rank``, independent of any other state."""
    import numpy as np
    import torch

    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def image_split(data_dir: Path, split: str) -> tuple[Tensor, Tensor, list[str]] | None:
    """(images uint8, labels, class names) of a split of an image dataset, None if absent."""
    from genloop.data.images import IMAGES_FILE, load_image_dataset

    directory = data_dir / "images" / split
    if not (directory / IMAGES_FILE).is_file():
        return None
    return load_image_dataset(directory)


def require_images(data_dir: Path, ref: str = "the dataset") -> tuple[Tensor, Tensor, list[str]]:
    """The training split of an image dataset, or a clear error."""
    found = image_split(data_dir, "train")
    if found is None:
        raise GenloopError(
            f"{ref} has no images (images/train is missing): image models train on a dataset "
            "prepared with data.kind: images"
        )
    if found[0].shape[0] == 0:
        raise GenloopError(f"{ref} has no training images")
    return found


# ------------------------------------------------------------------------------ model


def build_image_model(
    ws: Workspace, cfg: GenloopConfig, data_dir: Path, device: torch.device
) -> tuple[nn.Module, dict[str, Any], str | None]:
    """The image model to train, its config dict and the ref it continues from (if any).

    Sizes come from the dataset; ``model.image_size``/``channels``, when set, must agree
    with it; ``model.num_classes`` asks for a class-conditional model and must equal the
    dataset's number of classes.
    """

    from genloop.models.family import get_family

    m, family = cfg.model, cfg.model.family
    if cfg.data is not None and cfg.data.images.normalize != "minus_one_one":
        raise ConfigError(
            "the image families train on pixels in [-1, 1] (tanh outputs, the diffusion "
            "schedule's range): leave data.images.normalize at minus_one_one"
        )
    images, labels, classes = require_images(data_dir)
    _, channels, height, width = images.shape
    if height != width:
        raise GenloopError(f"image models need square images; the dataset's are {width}×{height}")
    if m.image_size is not None and m.image_size != height:
        raise ConfigError(
            f"model.image_size is {m.image_size} but the dataset's images are {height}×{height}: "
            f"prepare the data with data.images.size: {m.image_size}, or leave model.image_size "
            "unset"
        )
    if m.channels is not None and m.channels != channels:
        raise ConfigError(
            f"model.channels is {m.channels} but the dataset's images have {channels}: prepare "
            f"the data with data.images.channels: {m.channels}, or leave model.channels unset"
        )
    if m.num_classes is not None:
        if m.num_classes != len(classes):
            raise ConfigError(
                f"model.num_classes is {m.num_classes} but the dataset has {len(classes)} "
                f"classes ({', '.join(classes[:12])}); set it to {len(classes)}"
            )
        if labels.numel() and int(labels.min()) < 0:
            raise GenloopError(
                "a class-conditional model needs every training image labelled; the dataset "
                "has unlabelled images (put them in class sub-folders)"
            )
    if m.base_model is not None:  # continue training an image model version
        from genloop.train.loop import _base_model_dir

        base_dir, parent = _base_model_dir(ws, m.base_model)
        loaded = get_family(family).load(base_dir, device=device)
        loaded.train()
        return loaded, dict(getattr(loaded, "config", {})), parent

    config: dict[str, Any] = {
        "image_size": int(height),
        "channels": int(channels),
        "base_channels": m.base_channels,
        "num_classes": m.num_classes,
        "class_names": classes if m.num_classes is not None else [],
    }
    if family == "vae":
        config |= {"latent_dim": m.latent_dim, "beta": m.vae.beta}
        model: nn.Module = get_family("vae").build(config)
    elif family == "gan":
        g = m.gan
        config |= {"latent_dim": m.latent_dim, "loss": g.loss, "spectral_norm": g.spectral_norm}
        config["ema_decay"] = g.ema_decay
        model = get_family("gan").build(config)
    elif family == "diffusion":
        from genloop.models.diffusion import DiffusionModel

        d = m.diffusion
        config |= {
            "timesteps": d.timesteps,
            "beta_schedule": d.beta_schedule,
            "sampler": d.sampler,
            "sample_steps": d.sample_steps,
            "guidance_scale": d.guidance_scale,
            "cond_drop_prob": d.cond_drop_prob,
        }
        vae = None
        if d.latent_vae is not None:
            vae, vae_ref = _latent_vae(ws, d.latent_vae)
            config["latent_vae"] = vae_ref
            config["latent_scale"] = latent_scale(vae, images)
        model = DiffusionModel(config, vae)
    else:
        raise GenloopError(f"model.family {family!r} is not an image family")
    return model.to(device), dict(getattr(model, "config", config)), None


def _latent_vae(ws: Workspace, ref: str) -> tuple[Any, str]:
    """The trained VAE a latent diffusion model works in, and its resolved ref."""
    from genloop.models.vae import FAMILY as VAE
    from genloop.workspace import registry

    info = registry.resolve(ws, ref)
    if info.family != "vae":
        raise ConfigError(f"model.diffusion.latent_vae {ref!r} is a {info.family} model, not a vae")
    vae = VAE.load(ws.store.open_verified(info.artifact))
    if vae.conditional:
        raise ConfigError(
            f"latent diffusion needs an unconditional VAE (no num_classes); {info.ref} is "
            "class-conditional"
        )
    return vae, info.ref


def latent_scale(vae: Any, images: Tensor, batch: int = 512) -> float:
    """1 / std of the VAE's latent means over ``images`` (Stable Diffusion's
    ``scaling_factor``): the diffusion model then sees unit-variance latents."""
    import torch

    from genloop.data.images import normalize

    means = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            mu, _ = vae.encode(normalize(images[i : i + batch]))
            means.append(mu)
    std = float(torch.cat(means).std())
    if not math.isfinite(std) or std <= 0:
        raise GenloopError("the VAE's latents have no spread on this dataset; train the VAE more")
    return 1.0 / std


# -------------------------------------------------------------------------- objective


@dataclass
class ImageObjective:
    """Batches of normalized images + the family's random inputs; the family's loss."""

    name: str
    images: Tensor  # uint8 (N, C, H, W), the training split
    labels: Tensor  # int64 (N,)
    val_images: Tensor
    val_labels: Tensor
    batch_size: int
    seed: int
    device: torch.device
    draw: Draw
    family_loss: Callable[[nn.Module, Batch], Tensor]
    flip: bool = False
    crop_padding: int = 0
    jitter: float = 0.0
    ema: Callable[[], None] | None = None

    def _batch(self, images: Tensor, labels: Tensor, g: torch.Generator, train: bool) -> Batch:
        from genloop.data.images import augment, normalize

        x = normalize(images)
        if train and (self.flip or self.crop_padding or self.jitter):
            x = augment(x, g, flip=self.flip, crop_pad=self.crop_padding, jitter=self.jitter)
        extra = self.draw(x.shape[0], g)
        batch = {"images": x, "labels": labels, **extra}
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        from genloop.train.objectives import batch_indices

        order = batch_indices(
            len(self.images), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for step, idx in enumerate(order, start):
            g = batch_generator(self.seed, step, rank)
            yield self._batch(self.images[idx], self.labels[idx], g, train=True)

    def val_batches(self, n: int) -> list[Batch]:
        count, b = min(len(self.val_images), n * self.batch_size), self.batch_size
        return [
            self._batch(
                self.val_images[i : i + b],
                self.val_labels[i : i + b],
                batch_generator(self.seed, i // b, VAL_STREAM),  # the same every evaluation
                train=False,
            )
            for i in range(0, count, b)
        ]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        return self.family_loss(model, batch), int(batch["images"].shape[0])

    def after_step(self, model: nn.Module) -> None:
        """After each optimizer step: the GAN's EMA generator follows the generator."""
        if self.ema is not None:
            self.ema()


def make_image_objective(
    name: str, cfg: GenloopConfig, data_dir: Path, model: nn.Module, device: torch.device
) -> ImageObjective:
    """The ``vae``, ``gan`` or ``diffusion`` objective on the image dataset in ``data_dir``."""
    import torch

    from genloop.models.family import get_family

    if name not in IMAGE_OBJECTIVES:
        raise GenloopError(f"{name!r} is not an image objective ({', '.join(IMAGE_OBJECTIVES)})")
    if cfg.model.family != name:
        raise ConfigError(f"train.objective {name} needs model.family {name}")
    images, labels, _ = require_images(data_dir)
    val = image_split(data_dir, "val")
    if val is None:
        val_images, val_labels = images[:0], labels[:0]
    else:
        val_images, val_labels = val[0], val[1]
    draw = getattr(model, "draw", None)
    if draw is None:
        raise GenloopError(f"{type(model).__name__} is not a genloop {name} model")
    a = cfg.train.augment
    ema = getattr(model, "update_ema", None) if name == "gan" else None
    return ImageObjective(
        name=name,
        images=images,
        labels=labels,
        val_images=val_images,
        val_labels=val_labels,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        device=torch.device(device),
        draw=draw,
        family_loss=get_family(name).loss,
        flip=a.flip,
        crop_padding=a.crop_padding,
        jitter=a.jitter,
        ema=ema,
    )
