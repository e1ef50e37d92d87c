"""The diffusion family: a diffusers ``UNet2DModel`` trained as a DDPM (Ho et al., 2020),
sampled with DDPM or DDIM (Song et al., 2021), class-conditional with classifier-free
guidance (Ho & Salimans, 2022), optionally in a VAE's latent space (Rombach et al., 2022).

Training (ε-prediction)::

    x_0 = image (or z = scale · μ_VAE(image) for latent diffusion)       (B, c, s, s)
    t ~ U{0 … T-1},  ε ~ N(0, I),  x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε
    y' = null class with probability cond_drop_prob, else y            (for guidance)
    L = ‖ε_θ(x_t, t, y') - ε‖²

Sampling with guidance scale w: ε̂ = ε_θ(x_t, t, ∅) + w · (ε_θ(x_t, t, y) - ε_θ(x_t, t, ∅)),
then one scheduler step x_t → x_t-1; w = 1 is plain conditional sampling. The null class
is the extra class embedding ``num_classes`` (the UNet has ``num_classes + 1``).

Latent diffusion: the UNet denoises the VAE's latent vector viewed as a 1 × k × k image
(``latent_dim`` = k², k even), scaled to unit variance over the training set like Stable
Diffusion's ``scaling_factor``; samples are decoded by the VAE, which stays frozen.

Artifact (diffusers layout; ``DDPMPipeline.from_pretrained`` loads an unconditional one)::

    model_index.json                 the pipeline's parts
    unet/config.json, unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json  the training noise schedule (DDPMScheduler)
    diffusion.json                   genloop's settings: classes, guidance, sampler, latent
    vae/                             latent diffusion only: the VAE (config.json + weights)

Config dict keys: ``image_size``, ``channels``, ``base_channels``, ``num_classes``,
``class_names``, ``timesteps``, ``beta_schedule``, ``sampler``, ``sample_steps``,
``guidance_scale``, ``cond_drop_prob``, ``latent_scale`` (latent only), ``latent_vae``
(the VAE's model ref, for lineage) and ``vae`` (its config dict, latent only).
"""

from __future__ import annotations

import json
import math
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
    verify_dir,
)
from genloop.models.vae import ConvVAE

FORMAT = "genloop-diffusion"
FORMAT_VERSION = 1
SETTINGS_FILE = "diffusion.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
REQUIRED = ("image_size", "channels", "base_channels")
DEFAULTS: dict[str, Any] = {
    "num_classes": None,
    "class_names": [],
    "timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "sampler": "ddim",
    "sample_steps": 50,
    "guidance_scale": 2.0,
    "cond_drop_prob": 0.1,
    "latent_scale": None,
    "latent_vae": None,
    "vae": None,
}
SAMPLERS = ("ddpm", "ddim")


def _diffusers() -> Any:
    """The diffusers package, imported on first use (it is slow to import; untyped)."""
    import diffusers

    return diffusers


def unet_config(base: int, channels: int, size: int, num_classes: int | None) -> dict[str, Any]:
    """A small UNet for ``size`` × ``size`` inputs: one resolution level per stride-2 step
    down to 4 pixels, widths b, 2b, 2b…, one ResNet layer per level. Inputs of 16 pixels
    and more get self-attention at the lowest resolution; below that two 3×3 convolutions
    already see the whole 4×4 map, and attention cost time without helping (8×8 digits:
    the same FID and conditional accuracy, 1.5× slower steps)."""
    levels, _ = down_levels(size) if size >= 4 else (0, size)
    widths = tuple(base * min(2**i, 2) for i in range(levels + 1))
    n = len(widths)
    last = ("AttnDownBlock2D", "AttnUpBlock2D") if size >= 16 else ("DownBlock2D", "UpBlock2D")
    return {
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "layers_per_block": 1,
        "block_out_channels": widths,
        "down_block_types": ("DownBlock2D",) * (n - 1) + (last[0],),
        "up_block_types": (last[1],) + ("UpBlock2D",) * (n - 1),
        "norm_num_groups": math.gcd(base, 8),
        "attention_head_dim": min(32, widths[-1]),
        "num_class_embeds": None if num_classes is None else num_classes + 1,  # + the null class
    }


def scheduler_config(timesteps: int, beta_schedule: str, clip: bool) -> dict[str, Any]:
    return {
        "num_train_timesteps": timesteps,
        "beta_schedule": beta_schedule,
        "prediction_type": "epsilon",
        "clip_sample": clip,  # pixels stay in [-1, 1]; latents are not bounded
        "clip_sample_range": 1.0,
    }


class DiffusionModel(nn.Module):
    """UNet + noise schedule (+ a frozen VAE for latent diffusion). ``forward`` returns the
    training loss (so DDP can wrap it); :meth:`sample` generates."""

    latent_scale: Tensor  # a buffer: 1 for pixel-space models

    def __init__(self, config: Mapping[str, Any], vae: ConvVAE | None = None) -> None:
        super().__init__()
        check_image_config(config, REQUIRED)
        self.config: dict[str, Any] = {**DEFAULTS, **config}
        c = self.config
        if c["sampler"] not in SAMPLERS:
            raise GenloopError(f"unknown sampler {c['sampler']!r} (choose from: ddpm, ddim)")
        if not 1 <= int(c["sample_steps"]) <= int(c["timesteps"]):
            raise GenloopError(
                f"sample_steps ({c['sample_steps']}) must be between 1 and timesteps "
                f"({c['timesteps']})"
            )
        self.num_classes: int | None = c["num_classes"]
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False).eval()
            side = math.isqrt(vae.latent_dim)
            if side * side != vae.latent_dim or side % 2 or side < 2:
                raise GenloopError(
                    f"latent diffusion views the VAE's latent as a k × k image: latent_dim "
                    f"must be the square of an even number (4, 16, 36, 64, …), not {vae.latent_dim}"
                )
            if (vae.image_size, vae.channels) != (c["image_size"], c["channels"]):
                raise GenloopError(
                    f"the VAE makes {vae.channels}×{vae.image_size}×{vae.image_size} images, "
                    f"the diffusion model {c['channels']}×{c['image_size']}×{c['image_size']}"
                )
            if vae.conditional:
                raise GenloopError("latent diffusion needs an unconditional VAE (no num_classes)")
            self.sample_shape = (1, side, side)
            self.config["vae"] = dict(vae.config)
        else:
            self.sample_shape = (int(c["channels"]), int(c["image_size"]), int(c["image_size"]))
        scale = c["latent_scale"]
        self.register_buffer("latent_scale", torch.tensor(1.0 if scale is None else float(scale)))
        ch, size = self.sample_shape[0], self.sample_shape[1]
        d = _diffusers()
        self.unet: Any = d.UNet2DModel(
            **unet_config(int(c["base_channels"]), ch, size, self.num_classes)
        )
        self.schedule = scheduler_config(int(c["timesteps"]), c["beta_schedule"], vae is None)
        self.noise: Any = d.DDPMScheduler(**self.schedule)  # the training forward process

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def latent(self) -> bool:
        return self.vae is not None

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen
        return self

    def to_latent(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] → scaled latents (B, 1, k, k); the VAE's mean."""
        assert self.vae is not None
        with torch.no_grad():
            mu, _ = self.vae.encode(images)
        return (mu * self.latent_scale).view(images.shape[0], *self.sample_shape)

    def from_latent(self, latents: Tensor) -> Tensor:
        assert self.vae is not None
        z = latents.flatten(1) / self.latent_scale
        return self.vae.decode(z)

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random inputs of one training batch (CPU): ε, t and the label-drop mask."""
        t_max = int(self.config["timesteps"])
        return {
            "noise": torch.randn(batch_size, *self.sample_shape, generator=generator),
            "timesteps": torch.randint(0, t_max, (batch_size,), generator=generator),
            "drop": torch.rand(batch_size, generator=generator)
            < float(self.config["cond_drop_prob"]),
        }

    def _class_labels(self, labels: Tensor | None, drop: Tensor | None, n: int) -> Tensor | None:
        if self.num_classes is None:
            return None
        if labels is None:
            raise GenloopError("this diffusion model is class-conditional: batches need labels")
        check_labels(labels, self.num_classes)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return labels.long()

    def forward(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        noise: Tensor,
        timesteps: Tensor,
        drop: Tensor | None = None,
    ) -> Tensor:
        """The ε-prediction MSE of one batch."""
        x0 = self.to_latent(images) if self.latent else images
        xt = self.noise.add_noise(x0, noise, timesteps)
        ys = self._class_labels(labels, drop, images.shape[0])
        pred = self.unet(xt, timesteps, class_labels=ys).sample
        return F.mse_loss(pred.float(), noise.float())

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | None,
        n: int,
        generator: torch.Generator,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """``n`` images (n, C, H, W) in [-1, 1]. ``labels`` None on a conditional model
        samples unconditionally (the null class). A fresh scheduler per call, so calls from
        several threads do not share state."""
        c = self.config
        sampler = sampler or c["sampler"]
        steps = int(steps or c["sample_steps"])
        w = float(c["guidance_scale"] if guidance_scale is None else guidance_scale)
        if sampler not in SAMPLERS:
            raise GenloopError(f"unknown sampler {sampler!r} (choose from: ddpm, ddim)")
        if not 1 <= steps <= int(c["timesteps"]):
            raise GenloopError(f"steps must be between 1 and {c['timesteps']}, not {steps}")
        device = self.latent_scale.device
        was_training = self.training
        self.eval()
        try:
            if sampler == "ddim":
                scheduler = _diffusers().DDIMScheduler(**self.schedule, timestep_spacing="trailing")
            else:
                scheduler = _diffusers().DDPMScheduler(**self.schedule)
            scheduler.set_timesteps(steps)
            x = torch.randn(n, *self.sample_shape, generator=generator).to(device)
            ys = None
            if self.conditional:
                null = torch.full((n,), int(c["num_classes"]), dtype=torch.long, device=device)
                ys = null if labels is None else labels.to(device).long()
                check_labels(ys, int(c["num_classes"]) + 1)
            guided = ys is not None and labels is not None and w != 1.0
            for t in scheduler.timesteps:
                tt = torch.full((n,), int(t), dtype=torch.long, device=device)
                if guided:
                    assert ys is not None
                    both = self.unet(
                        torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([ys, null])
                    ).sample
                    eps_c, eps_u = both.chunk(2)
                    eps = eps_u + w * (eps_c - eps_u)
                else:
                    eps = self.unet(x, tt, class_labels=ys).sample
                kwargs = {"generator": generator} if sampler == "ddpm" else {"eta": 0.0}
                x = scheduler.step(eps, t, x, **kwargs).prev_sample
            out = self.from_latent(x) if self.latent else x
            return out.clamp(-1.0, 1.0)
        finally:
            self.train(was_training)


def build_diffusion(config: Mapping[str, Any], vae: ConvVAE | None = None) -> DiffusionModel:
    """A freshly initialised diffusion model; for latent diffusion pass the (trained) VAE,
    else the config's ``vae`` dict builds an untrained one of that shape."""
    if vae is None and config.get("vae"):
        vae = ConvVAE(config["vae"])
    return DiffusionModel(config, vae)


class Diffusion:
    """The ``diffusion`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "diffusion"

    def build(self, config: Mapping[str, Any]) -> DiffusionModel:
        return build_diffusion(config)

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = model(
            batch["images"],
            batch.get("labels"),
            noise=batch["noise"],
            timesteps=batch["timesteps"],
            drop=batch.get("drop"),
        )
        return out

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        from genloop.models.image_io import prepare_out, save_module_dir, write_settings
        from genloop.models.vae import FORMAT as VAE_FORMAT

        if not isinstance(model, DiffusionModel):
            raise GenloopError(f"expected a DiffusionModel, got {type(model).__name__}")
        out = Path(out_dir)
        prepare_out(out)
        settings = {k: v for k, v in model.config.items() if k != "vae"}
        settings["latent_scale"] = float(model.latent_scale) if model.latent else None
        write_settings(out, SETTINGS_FILE, FORMAT, settings, extra)
        model.unet.save_pretrained(out / "unet", safe_serialization=True)
        d = _diffusers()
        d.DDPMScheduler(**model.schedule).save_pretrained(out / "scheduler")
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": d.__version__,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        }
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if model.vae is not None:
            save_module_dir(model.vae, out / "vae", VAE_FORMAT, model.vae.config)
        return out

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> DiffusionModel:
        from genloop.models.image_io import load_state, read_config

        check_dtype(dtype)
        path = Path(path)
        verify_dir(path)
        config = read_diffusion_settings(path)
        vae = None
        if (path / "vae").is_dir():
            from genloop.models.vae import FORMAT as VAE_FORMAT

            vae = ConvVAE(read_config(path / "vae", VAE_FORMAT))
            load_state(vae, path / "vae")
        elif config.get("latent_scale") is not None:
            raise GenloopError(f"{path} is a latent diffusion model but has no vae/ folder")
        model = DiffusionModel(config, vae)
        _load_unet(model.unet, path / "unet")
        return model.to(device).eval()

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


def read_diffusion_settings(path: Path) -> dict[str, Any]:
    from genloop.models.image_io import read_settings

    return read_settings(path, SETTINGS_FILE, FORMAT)


def _load_unet(unet: nn.Module, directory: Path) -> None:
    """The UNet's weights from ``unet/``; its config.json must match the one genloop builds
    from diffusion.json, and every tensor must fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from genloop.errors import IntegrityError, NotFoundError

    weights = directory / UNET_WEIGHTS
    if not weights.is_file():
        raise NotFoundError(f"{directory} has no {UNET_WEIGHTS}")
    try:
        stored = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        state = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as exc:
        raise IntegrityError(f"{directory}: unreadable UNet ({exc})") from None
    built = dict(getattr(unet, "config", {}))
    for key in ("block_out_channels", "in_channels", "sample_size", "num_class_embeds"):
        a, b = stored.get(key), built.get(key)
        if (list(a) if isinstance(a, list | tuple) else a) != (
            list(b) if isinstance(b, list | tuple) else b
        ):
            raise IntegrityError(f"{directory}/config.json: {key} is {a!r}, expected {b!r}")
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise IntegrityError(
            f"{weights} does not fit the UNet (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )


FAMILY: Family = Diffusion()
