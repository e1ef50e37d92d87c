"""The image families (``vae``, ``gan``, ``diffusion``) for the training loop: the model,
sized by the dataset, and the objective, image batches for the one loop.

An image dataset version holds ``images/<split>/images.safetensors`` (uint8 N×C×H×W and
int64 labels) and ``classes.json`` (see ``genloop.data.images``). The model is sized by the
dataset: its image side, channels and (for ``model.num_classes``) its class list. A
trained model is sampled by ``genloop.models.image_generation.load_image_generator``.

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
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError
from genloop.train.families import BuiltModel, TrainingData, base_model_dir, wrong_family

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from genloop.config import ModelConfig, TrainConfig
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

VAL_STREAM = 1 << 20  # the "rank" of validation batches' generators: apart from training's
Batch = dict[str, "Tensor"]
Draw = Callable[[int, "torch.Generator"], dict[str, "Tensor"]]
# a family's network from the model section, the sizes the data gives and the training images
Network = Callable[["Workspace", "ModelConfig", dict[str, Any], "Tensor"], "nn.Module"]


def batch_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for micro-step ``step`` on ``rank``, independent of any other state."""
    import numpy as np
    import torch

    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def seeded_batches(
    size: int, batch_size: int, seed: int, start: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[list[int], torch.Generator]]:
    """Each training micro-step's indices from ``start`` on, with the step's own generator
    (:func:`batch_generator`): a resumed run draws what an uninterrupted one would."""
    from genloop.train.objectives import batch_indices

    order = batch_indices(size, batch_size, seed, start, rank=rank, world_size=world_size)
    for step, idx in enumerate(order, start):
        yield idx, batch_generator(seed, step, rank)


def val_windows(
    size: int, n: int, batch_size: int, seed: int
) -> list[tuple[slice, torch.Generator]]:
    """The first ``n`` validation batches of ``size`` items, as slices, each with a generator
    that is the same at every evaluation."""
    count = min(size, n * batch_size)
    return [
        (slice(i, i + batch_size), batch_generator(seed, i // batch_size, VAL_STREAM))
        for i in range(0, count, batch_size)
    ]


# ------------------------------------------------------------------------------ model


def build_model(
    ws: Workspace,
    m: ModelConfig,
    data: TrainingData,
    device: torch.device,
    network: Network,
) -> BuiltModel:
    """The image model to train, its config dict and the ref it continues from (if any).

    Sizes come from the dataset; ``model.image_size``/``channels``, when set, must agree
    with it; ``model.num_classes`` asks for a class-conditional model and must equal the
    dataset's number of classes. ``network`` builds the family's model from the sizes.
    """
    from genloop.data.images import require_images
    from genloop.models.family import get_family

    if data.image_normalize not in (None, "minus_one_one"):
        raise ConfigError(
            "the image families train on pixels in [-1, 1] (tanh outputs, the diffusion "
            "schedule's range): leave data.images.normalize at minus_one_one"
        )
    images, labels, classes = require_images(data.dir)
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
        base_dir, parent = base_model_dir(ws, m.base_model)
        loaded = get_family(m.family).load(base_dir, device=device)
        loaded.train()
        return BuiltModel(loaded, dict(getattr(loaded, "config", {})), parent)

    config: dict[str, Any] = {
        "image_size": int(height),
        "channels": int(channels),
        "base_channels": m.base_channels,
        "num_classes": m.num_classes,
        "class_names": classes if m.num_classes is not None else [],
    }
    model = network(ws, m, config, images)
    return BuiltModel(model.to(device), dict(getattr(model, "config", config)), None)


def vae_network(ws: Workspace, m: ModelConfig, config: dict[str, Any], images: Tensor) -> nn.Module:
    from genloop.models.family import get_family

    return get_family("vae").build({**config, "latent_dim": m.latent_dim, "beta": m.vae.beta})


def gan_network(ws: Workspace, m: ModelConfig, config: dict[str, Any], images: Tensor) -> nn.Module:
    from genloop.models.family import get_family

    g = m.gan
    return get_family("gan").build(
        {
            **config,
            "latent_dim": m.latent_dim,
            "loss": g.loss,
            "spectral_norm": g.spectral_norm,
            "ema_decay": g.ema_decay,
        }
    )


def diffusion_network(
    ws: Workspace, m: ModelConfig, config: dict[str, Any], images: Tensor
) -> nn.Module:
    """A pixel-space UNet, or a latent one in the space of ``model.diffusion.latent_vae``."""
    from genloop.models.diffusion import DiffusionModel

    d = m.diffusion
    config = {
        **config,
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
    return DiffusionModel(config, vae)


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
        batches = seeded_batches(
            len(self.images), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for idx, g in batches:
            yield self._batch(self.images[idx], self.labels[idx], g, train=True)

    def val_batches(self, n: int) -> list[Batch]:
        windows = val_windows(len(self.val_images), n, self.batch_size, self.seed)
        return [
            self._batch(self.val_images[w], self.val_labels[w], g, train=False) for w, g in windows
        ]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        return self.family_loss(model, batch), int(batch["images"].shape[0])

    def after_step(self, model: nn.Module) -> None:
        """After each optimizer step: the GAN's EMA generator follows the generator."""
        if self.ema is not None:
            self.ema()


def make_objective(
    family: str, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> ImageObjective:
    """The ``family`` objective (``vae``, ``gan`` or ``diffusion``) on the image dataset."""
    import torch

    from genloop.data.images import image_split, require_images
    from genloop.models.family import get_family

    name = t.objective
    if name != family:
        raise wrong_family(name)
    images, labels, _ = require_images(data.dir)
    val = image_split(data.dir, "val")
    if val is None:
        val_images, val_labels = images[:0], labels[:0]
    else:
        val_images, val_labels = val[0], val[1]
    draw = getattr(model, "draw", None)
    if draw is None:
        raise GenloopError(f"{type(model).__name__} is not a genloop {name} model")
    a = t.augment
    ema = getattr(model, "update_ema", None) if name == "gan" else None
    return ImageObjective(
        name=name,
        images=images,
        labels=labels,
        val_images=val_images,
        val_labels=val_labels,
        batch_size=t.batch_size,
        seed=t.seed,
        device=torch.device(device),
        draw=draw,
        family_loss=get_family(name).loss,
        flip=a.flip,
        crop_padding=a.crop_padding,
        jitter=a.jitter,
        ema=ema,
    )


@dataclass(frozen=True)
class ImageBuilder:
    """An image family as the loop builds it (see ``families.Builder``)."""

    family: str
    network: Network
    sampler: str = "genloop.models.image_generation:load_image_generator"

    def build_model(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        *,
        trust_pickle: bool = False,  # image models are read from safetensors only
    ) -> BuiltModel:
        return build_model(ws, m, data, device, self.network)

    def make_objective(
        self, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
    ) -> ImageObjective:
        return make_objective(self.family, t, data, model, device)


BUILDERS = {
    b.family: b
    for b in (
        ImageBuilder("vae", vae_network),
        ImageBuilder("gan", gan_network),
        ImageBuilder("diffusion", diffusion_network),
    )
}
