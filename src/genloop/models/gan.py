"""The GAN family: a DCGAN-style generator and discriminator (Radford et al., 2016).

    generator      z (B, L) [‖ embed(y)] → linear → (B, W, h, h) → [convT ×2 + BN + ReLU]… → tanh
    discriminator  x (B, C, H, W) → [conv stride 2 + LeakyReLU]… → φ(x) (B, F)
                   D(x, y) = w·φ(x) [+ embed(y)·φ(x)]  (projection discriminator, Miyato 2018)

Spectral norm (Miyato et al., 2018) on every discriminator layer when ``spectral_norm``; the
loss is ``hinge`` (Lim & Ye 2017) or ``non_saturating`` (Goodfellow 2014)::

    hinge           L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]     L_G = -E[D(G(z))]
    non_saturating  L_D = E[softplus(-D(x))] + E[softplus(D(G(z)))]    L_G = E[softplus(-D(G(z)))]

One optimizer trains both networks with simultaneous updates: ``forward`` returns
``L_D + L_G`` where ``L_D`` sees the fakes detached (no gradient to G) and ``L_G`` runs D
with its parameters frozen (no gradient to D), so one backward pass gives each network
exactly its own gradient. This keeps the training loop, checkpoints and exact resume the
same as every other family's.

An exponential moving average of the generator's weights (``ema_decay``; Karras 2018,
Yazıcı 2019) is what samples are drawn from; its decay warms up as
min(decay, (1 + n) / (10 + n)) after n updates so early weights fade quickly. In eval mode
``forward`` returns a sample-quality measure instead of an adversarial loss, which says
nothing about progress: the unbiased kernel MMD² (pixel space, Gaussian kernels) between
the EMA generator's samples and the real batch.

Config dict keys: ``image_size``, ``channels``, ``latent_dim``, ``base_channels``,
``num_classes``, ``loss``, ``spectral_norm``, ``ema_decay`` (None: no EMA),
``class_names``. Artifact: ``config.json`` + ``model.safetensors`` (G, D and the EMA G).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.models.family import Family, count_parameters
from genloop.models.image_io import (
    check_dtype,
    check_image_config,
    check_labels,
    down_levels,
    load_state,
    read_config,
    save_module_dir,
    verify_dir,
)
from genloop.models.vae import widths

FORMAT = "genloop-gan"
REQUIRED = ("image_size", "channels", "latent_dim", "base_channels")
DEFAULTS: dict[str, Any] = {
    "num_classes": None,
    "loss": "hinge",
    "spectral_norm": True,
    "ema_decay": 0.999,
    "class_names": [],
}
LOSSES = ("hinge", "non_saturating")
MMD_SCALES = (0.1, 0.3, 1.0)  # kernel widths, in mean squared pixel difference ([-1, 1])


class Generator(nn.Module):
    def __init__(
        self, image_size: int, channels: int, latent_dim: int, base: int, num_classes: int | None
    ) -> None:
        super().__init__()
        levels, final = down_levels(image_size)
        w = widths(base, levels)
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        z_in = latent_dim * (2 if num_classes else 1)
        self.top = (w[-1], final, final)
        self.project = nn.Linear(z_in, w[-1] * final * final)
        self.top_norm = nn.BatchNorm2d(w[-1])
        ups: list[nn.Module] = []
        for i in reversed(range(levels)):  # (B, w[i+1], s, s) → (B, w[i], 2s, 2s)
            ups += [nn.ConvTranspose2d(w[i + 1], w[i], 4, stride=2, padding=1, bias=False)]
            ups += [nn.BatchNorm2d(w[i]), nn.ReLU()]
        ups += [nn.Conv2d(w[0], channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*ups)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            if labels is None:
                raise GenloopError("this GAN is class-conditional: it needs labels")
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = F.relu(self.top_norm(self.project(z).view(z.shape[0], *self.top)))
        out: Tensor = self.body(h)
        return out


class Discriminator(nn.Module):
    def __init__(
        self,
        image_size: int,
        channels: int,
        base: int,
        num_classes: int | None,
        spectral_norm: bool,
    ) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import spectral_norm as sn

        def norm(m: nn.Module) -> nn.Module:
            return sn(m) if spectral_norm else m

        levels, final = down_levels(image_size)
        w = widths(base, levels)
        layers: list[nn.Module] = [norm(nn.Conv2d(channels, w[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for i in range(levels):
            layers += [norm(nn.Conv2d(w[i], w[i + 1], 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        feat = w[-1] * final * final
        self.out = norm(nn.Linear(feat, 1))
        self.embed = norm(nn.Embedding(num_classes, feat)) if num_classes else None

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """One score per image (B,); higher means "real"."""
        h = self.body(images).flatten(1)  # φ(x): (B, F)
        score: Tensor = self.out(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise GenloopError("this GAN is class-conditional: it needs labels")
            score = score + (self.embed(labels) * h).sum(1)
        return score


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradient reaches ``module``'s parameters inside the block (they still flow
    through it to its inputs)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased kernel MMD² between two image batches (Gretton et al., 2012): a sum of
    Gaussian kernels over ``MMD_SCALES``, distance = mean squared pixel difference. About
    0 (it can dip below) when both come from one distribution."""
    a, b = x.flatten(1).float(), y.flatten(1).float()
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    if n < 2 or m < 2:
        raise GenloopError("MMD needs at least 2 images on each side")

    def k(u: Tensor, v: Tensor) -> Tensor:
        d = torch.cdist(u, v).pow(2) / dim
        return sum((torch.exp(-d / s) for s in MMD_SCALES), torch.zeros_like(d))

    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    within_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    within_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return within_a + within_b - 2 * kab.mean()


class DCGAN(nn.Module):
    """Generator, discriminator and the generator's EMA copy; ``forward`` returns the
    training loss (L_D + L_G) in train mode and MMD² of samples in eval mode."""

    ema_updates: Tensor  # a buffer (with an EMA): updates so far, for the decay warmup

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        check_image_config(config, REQUIRED)
        self.config: dict[str, Any] = {**DEFAULTS, **config}
        c = self.config
        if c["loss"] not in LOSSES:
            raise GenloopError(f"unknown GAN loss {c['loss']!r} (choose from: {', '.join(LOSSES)})")
        decay = c["ema_decay"]
        if decay is not None and not 0 < float(decay) < 1:
            raise GenloopError(f"ema_decay must be in (0, 1) or null, not {decay}")
        self.latent_dim, self.num_classes = int(c["latent_dim"]), c["num_classes"]
        self.loss_kind: str = c["loss"]
        self.ema_decay: float | None = None if decay is None else float(decay)
        size, ch, base = int(c["image_size"]), int(c["channels"]), int(c["base_channels"])
        self.generator = Generator(size, ch, self.latent_dim, base, self.num_classes)
        self.discriminator = Discriminator(size, ch, base, self.num_classes, c["spectral_norm"])
        self.ema: Generator | None = None
        if self.ema_decay is not None:
            self.ema = copy.deepcopy(self.generator).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def sampler(self) -> Generator:
        """The network samples come from: the EMA generator when there is one."""
        return self.ema if self.ema is not None else self.generator

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random inputs of one training batch: the noise z (CPU)."""
        return {"z": torch.randn(batch_size, self.latent_dim, generator=generator)}

    def forward(self, images: Tensor, labels: Tensor | None = None, *, z: Tensor) -> Tensor:
        if self.conditional:
            if labels is None:
                raise GenloopError("this GAN is class-conditional: batches need labels")
            check_labels(labels, self.num_classes)
        else:
            labels = None
        if not self.training:  # sample quality, the number validation tracks
            with torch.no_grad():
                samples: Tensor = self.sampler()(z, labels)
                return mmd2(samples, images)
        d = self.discriminator
        fake: Tensor = self.generator(z, labels)
        real_score: Tensor = d(images, labels)
        fake_score: Tensor = d(fake.detach(), labels)  # L_D: no gradient into G
        with frozen(d):  # L_G: no gradient into D
            gen_score: Tensor = d(fake, labels)
        if self.loss_kind == "hinge":
            loss_d = F.relu(1 - real_score).mean() + F.relu(1 + fake_score).mean()
            loss_g = -gen_score.mean()
        else:
            loss_d = F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
            loss_g = F.softplus(-gen_score).mean()
        return loss_d + loss_g

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the EMA generator towards the generator (after each optimizer step)."""
        if self.ema is None or self.ema_decay is None:
            return
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        for e, p in zip(self.ema.parameters(), self.generator.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - decay)
        for eb, b in zip(self.ema.buffers(), self.generator.buffers(), strict=True):
            eb.copy_(b)  # BatchNorm statistics
        self.ema_updates += 1

    @torch.no_grad()
    def sample(self, labels: Tensor | None, n: int, generator: torch.Generator) -> Tensor:
        """``n`` images (n, C, H, W) in [-1, 1] from the EMA generator, in eval mode."""
        net = self.sampler()
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        try:
            z = torch.randn(n, self.latent_dim, generator=generator).to(device)
            if self.conditional and labels is None:
                raise GenloopError("this GAN is class-conditional: give labels to sample")
            ys = labels.to(device) if self.conditional and labels is not None else None
            images: Tensor = net(z, ys)
            return images.clamp(-1.0, 1.0)
        finally:
            net.train(was_training)


class GAN:
    """The ``gan`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "gan"

    def build(self, config: Mapping[str, Any]) -> DCGAN:
        """A freshly initialised GAN (seed torch first for a reproducible one)."""
        return DCGAN(config)

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = model(batch["images"], batch.get("labels"), z=batch["z"])
        return out

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        if not isinstance(model, DCGAN):
            raise GenloopError(f"expected a DCGAN, got {type(model).__name__}")
        return save_module_dir(model, out_dir, FORMAT, {**model.config, **(extra or {})})

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> DCGAN:
        check_dtype(dtype)
        path = Path(path)
        verify_dir(path)
        model = DCGAN(read_config(path, FORMAT))
        load_state(model, path)
        return model.to(device).eval()

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


FAMILY: Family = GAN()
