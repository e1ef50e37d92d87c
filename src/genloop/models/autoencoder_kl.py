"""The ``autoencoder_kl`` family: Stable Diffusion's first stage, a diffusers ``AutoencoderKL``
(Rombach et al., 2022), trained on its own before the text-conditioned UNet works in its
latent space.

    encoder   x (B, C, H, W) in [-1, 1] → (μ, log σ²), each (B, c, H/f, W/f)    f = downsample
    sample    z = μ + σ·ε, ε ~ N(0, I)
    decoder   z → x̂ (B, C, H, W)

Loss per image, reported per pixel (divided by C·H·W) like the ``vae`` family::

    L = Σ |x - x̂|  (or Σ (x - x̂)²)  +  kl_weight · KL(q(z|x) ‖ N(0, I))

This is SD's ``LPIPSWithDiscriminator`` recipe (L1 + 1e-6·KL) without its LPIPS and patch-GAN
terms: at 32×32 on flat-coloured shapes a pixel loss alone reconstructs well, and those two
need a pretrained VGG and a second network. The tiny KL weight keeps the latents near
N(0, I) in shape but lets their scale drift; :func:`latent_scaling_factor` measures it over
the training set (1 / std of the latent means, SD's ``scaling_factor``), stored in the
diffusers config, so the UNet sees unit-variance latents.

Config dict keys: ``image_size``, ``channels``, ``base_channels``, ``latent_channels`` (4),
``downsample`` (f: 4 makes 32×32 → 8×8; a power of two), ``kl_weight``, ``recon_loss``
(``l1`` or ``mse``), ``scaling_factor``.

Artifact (diffusers layout; ``AutoencoderKL.from_pretrained`` loads it)::

    config.json                          the diffusers config (with scaling_factor)
    diffusion_pytorch_model.safetensors  the weights
    autoencoder_kl.json                  genloop's settings (loss, image size)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genloop.errors import ConfigError, GenloopError
from genloop.models.family import Family, count_parameters
from genloop.models.image_io import check_dtype, check_image_config, read_settings, verify_dir

FORMAT = "genloop-autoencoder-kl"
FORMAT_VERSION = 1
SETTINGS_FILE = "autoencoder_kl.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
REQUIRED = ("image_size", "channels", "base_channels")
DEFAULTS: dict[str, Any] = {
    "latent_channels": 4,
    "downsample": 4,
    "kl_weight": 1e-6,
    "recon_loss": "l1",
    "scaling_factor": 1.0,
}
RECON_LOSSES = ("l1", "mse")


def vae_config(
    base: int, channels: int, size: int, latent_channels: int, downsample: int, scaling: float
) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config: one block per resolution (log2 f + 1 blocks,
    the last does not downsample), widths b, 2b, 4b, 4b…, like SD's (128, 256, 512, 512)."""
    levels = int(math.log2(downsample))
    widths = tuple(base * min(2**i, 4) for i in range(levels + 1))
    return {
        "in_channels": channels,
        "out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(widths),
        "up_block_types": ("UpDecoderBlock2D",) * len(widths),
        "block_out_channels": widths,
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": math.gcd(base, 32),
        "sample_size": size,
        "scaling_factor": scaling,
    }


def check_config(c: Mapping[str, Any]) -> None:
    check_image_config(c, REQUIRED)
    f, size = int(c["downsample"]), int(c["image_size"])
    if f < 1 or f & (f - 1) or size % f:
        raise ConfigError(
            f"downsample must be a power of two that divides image_size ({size}), not {f}"
        )
    if c["recon_loss"] not in RECON_LOSSES:
        raise ConfigError(f"recon_loss must be l1 or mse, not {c['recon_loss']!r}")
    if int(c["latent_channels"]) < 1:
        raise ConfigError(f"latent_channels must be positive, not {c['latent_channels']}")
    if float(c["kl_weight"]) < 0:
        raise ConfigError(f"kl_weight must be ≥ 0, not {c['kl_weight']}")


class AutoencoderKLModel(nn.Module):
    """The diffusers ``AutoencoderKL`` (``.vae``) + genloop's settings; ``forward`` returns
    the training loss (so DDP can wrap it)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config: dict[str, Any] = {**DEFAULTS, **config}
        c = self.config
        check_config(c)
        import diffusers

        self.image_size, self.channels = int(c["image_size"]), int(c["channels"])
        side = self.image_size // int(c["downsample"])
        self.latent_shape = (int(c["latent_channels"]), side, side)
        # training images (uint8) that save() measures the scaling factor on, when set
        self.calibration_images: Tensor | None = None
        d: Any = diffusers  # untyped
        self.vae: Any = d.AutoencoderKL(
            **vae_config(
                int(c["base_channels"]),
                self.channels,
                self.image_size,
                int(c["latent_channels"]),
                int(c["downsample"]),
                float(c["scaling_factor"]),
            )
        )

    @property
    def scaling_factor(self) -> float:
        return float(self.config["scaling_factor"])

    def set_scaling_factor(self, value: float) -> None:
        """Store SD's latent scale in both configs (genloop's and the diffusers one)."""
        self.config["scaling_factor"] = float(value)
        self.vae.register_to_config(scaling_factor=float(value))

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²), each (B, c, H/f, W/f), of images in [-1, 1]."""
        dist = self.vae.encode(images).latent_dist
        return dist.mean, dist.logvar

    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, C, H, W), about [-1, 1] (not clamped), from unscaled latents."""
        out: Tensor = self.vae.decode(latents).sample
        return out

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random inputs of one training batch: ε for the posterior sample (CPU)."""
        return {"eps": torch.randn(batch_size, *self.latent_shape, generator=generator)}

    def forward(self, images: Tensor, labels: Tensor | None = None, *, eps: Tensor) -> Tensor:
        """Reconstruction + kl_weight · KL per pixel, averaged over the batch."""
        mu, logvar = self.encode(images)
        z = mu + torch.exp(0.5 * logvar) * eps
        diff = self.decode(z).float() - images.float()
        err = diff.abs() if self.config["recon_loss"] == "l1" else diff.pow(2)
        rec = err.flatten(1).sum(1)  # (B,)
        kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1)
        pixels = images[0].numel()
        return ((rec + float(self.config["kl_weight"]) * kl.sum(1)) / pixels).mean()

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] → their decoded latent means (B, C, H, W), clamped to [-1, 1]."""
        mu, _ = self.encode(images)
        return self.decode(mu).clamp(-1.0, 1.0)

    @torch.no_grad()
    def sample(self, labels: Tensor | None, n: int, generator: torch.Generator) -> Tensor:
        """``n`` decodes of latents from N(0, I) / scaling_factor, (n, C, H, W) in [-1, 1]:
        an autoencoder is no generative model, but this shows what its latent space holds."""
        device = next(self.parameters()).device
        z = torch.randn(n, *self.latent_shape, generator=generator).to(device)
        return self.decode(z / self.scaling_factor).clamp(-1.0, 1.0)


@torch.no_grad()
def latent_scaling_factor(model: AutoencoderKLModel, images: Tensor, batch: int = 256) -> float:
    """1 / std of the latent means over ``images`` (uint8 N×C×H×W), SD's ``scaling_factor``."""
    from genloop.data.images import normalize

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        means = [
            model.encode(normalize(images[i : i + batch]).to(device))[0].float().cpu()
            for i in range(0, images.shape[0], batch)
        ]
    finally:
        model.train(was_training)
    std = float(torch.cat(means).std()) if means else float("nan")
    if not math.isfinite(std) or std <= 0:
        raise GenloopError("the autoencoder's latents have no spread on this dataset")
    return 1.0 / std


class AutoencoderKLFamily:
    """The ``autoencoder_kl`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "autoencoder_kl"

    def build(self, config: Mapping[str, Any]) -> AutoencoderKLModel:
        """A freshly initialised autoencoder (seed torch first for a reproducible one)."""
        return AutoencoderKLModel(config)

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = model(batch["images"], eps=batch["eps"])
        return out

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        from genloop.models.image_io import prepare_out, write_settings

        if not isinstance(model, AutoencoderKLModel):
            raise GenloopError(f"expected an AutoencoderKLModel, got {type(model).__name__}")
        if model.calibration_images is not None:  # set by the training builder
            model.set_scaling_factor(latent_scaling_factor(model, model.calibration_images))
        out = Path(out_dir)
        prepare_out(out)
        model.vae.save_pretrained(out, safe_serialization=True)
        write_settings(out, SETTINGS_FILE, FORMAT, model.config, extra)
        return out

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> AutoencoderKLModel:
        check_dtype(dtype)
        path = Path(path)
        verify_dir(path)
        model = AutoencoderKLModel(read_settings(path, SETTINGS_FILE, FORMAT))
        load_diffusers_weights(model.vae, path, ("block_out_channels", "latent_channels"))
        return model.to(device).eval()

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


def load_diffusers_weights(module: nn.Module, directory: Path, keys: tuple[str, ...]) -> None:
    """A diffusers model's weights from ``directory``; its config.json must agree with the
    module genloop built on ``keys``, and every tensor must fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from genloop.errors import IntegrityError, NotFoundError

    weights = directory / WEIGHTS
    if not weights.is_file():
        raise NotFoundError(f"{directory} has no {WEIGHTS}")
    try:
        stored = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        state = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as exc:
        raise IntegrityError(f"{directory}: unreadable weights or config ({exc})") from None
    built = dict(getattr(module, "config", {}))
    for key in keys:
        a, b = stored.get(key), built.get(key)
        if (list(a) if isinstance(a, list | tuple) else a) != (
            list(b) if isinstance(b, list | tuple) else b
        ):
            raise IntegrityError(f"{directory}/config.json: {key} is {a!r}, expected {b!r}")
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise IntegrityError(f"{weights} does not fit its config.json ({first})") from None
    if missing or unexpected:
        raise IntegrityError(
            f"{weights} does not fit its config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )


FAMILY: Family = AutoencoderKLFamily()
