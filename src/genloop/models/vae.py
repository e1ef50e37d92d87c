"""The VAE family: a convolutional variational autoencoder (Kingma & Welling, 2014).

    encoder   x (B, C, H, W) → conv stack → flatten [+ one-hot y] → linear → (μ, log σ²) (B, L)
    sample    z = μ + σ·ε, ε ~ N(0, I)                         (the reparameterisation)
    decoder   z [+ one-hot y] → linear → (B, W, h, h) → upsample + conv … → x̂ (B, C, H, W)

Loss per image (pixels in [-1, 1]): a Gaussian reconstruction term with a fixed standard
deviation ``recon_std`` plus β times the KL divergence to the prior N(0, I)::

    L = Σ (x - x̂)² / (2·recon_std²) + β · KL(q(z|x) ‖ N(0, I))

reported per pixel (divided by C·H·W), so its scale does not depend on the image size.
With ``num_classes`` set the encoder and decoder both see the label (a conditional VAE);
sampling draws z from the prior and decodes it with the requested label.

Config dict keys: ``image_size``, ``channels``, ``latent_dim``, ``base_channels``,
``num_classes`` (None: unconditional), ``beta``, ``recon_std``, ``class_names``.
Artifact: ``config.json`` + ``model.safetensors`` (see ``image_io``).
"""

from __future__ import annotations

from collections.abc import Mapping
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

FORMAT = "genloop-vae"
REQUIRED = ("image_size", "channels", "latent_dim", "base_channels")
DEFAULTS: dict[str, Any] = {"num_classes": None, "beta": 1.0, "recon_std": 0.2, "class_names": []}


def widths(base: int, levels: int) -> list[int]:
    """Channels at each resolution, from the full size down: b, 2b, 4b, 4b, …"""
    return [base * min(2**i, 4) for i in range(levels + 1)]


class ConvVAE(nn.Module):
    """A small convolutional VAE; ``forward`` returns the training loss (so DDP can wrap
    it). Build it with :meth:`VAE.build` from a config dict."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        check_image_config(config, REQUIRED)
        self.config: dict[str, Any] = {**DEFAULTS, **config}
        c = self.config
        self.image_size, self.channels = int(c["image_size"]), int(c["channels"])
        self.latent_dim = int(c["latent_dim"])
        self.num_classes: int | None = c["num_classes"]
        self.beta, self.recon_std = float(c["beta"]), float(c["recon_std"])
        levels, self.final = down_levels(self.image_size)
        w = widths(int(c["base_channels"]), levels)
        k = self.num_classes or 0

        enc: list[nn.Module] = [nn.Conv2d(self.channels, w[0], 3, padding=1), nn.SiLU()]
        for i in range(levels):  # (B, w[i], s, s) → (B, w[i+1], s/2, s/2)
            enc += [nn.Conv2d(w[i], w[i + 1], 4, stride=2, padding=1), nn.SiLU()]
        self.encoder = nn.Sequential(*enc)
        self.top = (w[-1], self.final, self.final)
        feat = w[-1] * self.final * self.final
        self.to_stats = nn.Linear(feat + k, 2 * self.latent_dim)  # → (μ, log σ²)
        self.from_latent = nn.Linear(self.latent_dim + k, feat)
        dec: list[nn.Module] = []
        for i in reversed(range(levels)):  # (B, w[i+1], s, s) → (B, w[i], 2s, 2s)
            dec += [nn.SiLU(), nn.Upsample(scale_factor=2.0, mode="nearest")]
            dec += [nn.Conv2d(w[i + 1], w[i], 3, padding=1)]
        dec += [nn.SiLU(), nn.Conv2d(w[0], self.channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def _one_hot(self, labels: Tensor | None, batch: int, like: Tensor) -> Tensor | None:
        if self.num_classes is None:
            return None
        if labels is None or labels.shape != (batch,):
            raise GenloopError(f"this VAE is class-conditional: it needs {batch} labels")
        check_labels(labels, self.num_classes)
        return F.one_hot(labels.long(), self.num_classes).to(like.dtype)

    def encode(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(μ, log σ²), each (B, L), of images in [-1, 1]."""
        h = self.encoder(images).flatten(1)
        y = self._one_hot(labels, images.shape[0], h)
        if y is not None:
            h = torch.cat([h, y], dim=1)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W), about [-1, 1] (not clamped), from latents (B, L)."""
        y = self._one_hot(labels, z.shape[0], z)
        if y is not None:
            z = torch.cat([z, y], dim=1)
        h = self.from_latent(z).view(z.shape[0], *self.top)
        out: Tensor = self.decoder(h)
        return out

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random inputs of one training batch: ε for the reparameterisation (CPU)."""
        return {"eps": torch.randn(batch_size, self.latent_dim, generator=generator)}

    def forward(self, images: Tensor, labels: Tensor | None = None, *, eps: Tensor) -> Tensor:
        """The negative ELBO per pixel, averaged over the batch (β-weighted KL)."""
        mu, logvar = self.encode(images, labels)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = self.decode(z, labels)
        sq = (recon.float() - images.float()).pow(2).flatten(1).sum(1)  # (B,)
        rec = sq / (2 * self.recon_std**2)
        kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(1)
        pixels = images[0].numel()
        return ((rec + self.beta * kl) / pixels).mean()

    @torch.no_grad()
    def sample(self, labels: Tensor | None, n: int, generator: torch.Generator) -> Tensor:
        """``n`` images (n, C, H, W) in [-1, 1]: z from the prior, decoded."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        return self.decode(z, None if labels is None else labels.to(device)).clamp(-1.0, 1.0)


@torch.no_grad()
def interpolate(
    model: ConvVAE,
    a: Tensor,
    b: Tensor,
    steps: int,
    labels: tuple[int, int] | None = None,
) -> Tensor:
    """Decode ``steps`` points on the line between the latent means of images ``a`` and
    ``b`` (each (C, H, W) in [-1, 1]); returns (steps, C, H, W) in [-1, 1], from a to b.

    For a conditional model ``labels`` gives each image's class; the label switches half way.
    """
    if steps < 2:
        raise GenloopError(f"interpolation needs at least 2 steps, not {steps}")
    device = next(model.parameters()).device
    pair = torch.stack([a, b]).to(device)
    ys = None if labels is None else torch.tensor(labels, device=device)
    mu, _ = model.encode(pair, ys)
    w = torch.linspace(0.0, 1.0, steps, device=device)[:, None]  # (S, 1)
    z = (1 - w) * mu[0] + w * mu[1]  # (S, L)
    step_labels = None
    if ys is not None:
        step_labels = torch.where(w[:, 0] < 0.5, ys[0], ys[1])
    return model.decode(z, step_labels).clamp(-1.0, 1.0)


class VAE:
    """The ``vae`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "vae"

    def build(self, config: Mapping[str, Any]) -> ConvVAE:
        """A freshly initialised VAE (seed torch first for a reproducible one)."""
        return ConvVAE(config)

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = model(batch["images"], batch.get("labels"), eps=batch["eps"])
        return out

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        if not isinstance(model, ConvVAE):
            raise GenloopError(f"expected a ConvVAE, got {type(model).__name__}")
        return save_module_dir(model, out_dir, FORMAT, {**model.config, **(extra or {})})

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> ConvVAE:
        check_dtype(dtype)
        path = Path(path)
        verify_dir(path)
        model = ConvVAE(read_config(path, FORMAT))
        load_state(model, path)
        return model.to(device).eval()

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


FAMILY: Family = VAE()
