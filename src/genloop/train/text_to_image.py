"""Stable Diffusion's recipe at small scale, for the training loop: first the autoencoder
(``autoencoder_kl``), then the UNet on its latents, conditioned on a frozen CLIP text
encoder (``text_to_image``).

The autoencoder trains like the other image families (``train/images.py``): images in
[-1, 1], the family's loss; its builder hands the model a sample of the training images so
that saving it measures SD's ``scaling_factor`` (1 / std of the latents) over them.

The UNet trains on a captioned image dataset (``images/<split>/captions.json``, see
``genloop.data.images.caption_split``). Both frozen parts are read once: every training
image's posterior (μ, σ) under the autoencoder and every caption's token ids are computed
when the objective is made, so a step runs the text encoder and the UNet only::

    latents    (B, 4, h, w)  s · (μ + σ·ε'), a fresh posterior sample each step
    input_ids  (B, L)        the caption's tokens, or the empty prompt's (cond_drop_prob)
    noise, timesteps         ε and t of the forward process

Every random number of micro-step ``s`` comes from a generator seeded by ``(train.seed, s,
rank)`` (see ``images.batch_generator``), so a resumed run sees the same batches.
Augmentation is refused: the captions name positions (left, right) that a flip would swap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError
from genloop.train.families import BuiltModel, TrainingData, base_model_dir, wrong_family
from genloop.train.images import build_model, seeded_batches, val_windows

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from genloop.config import LoraConfig, ModelConfig, TrainConfig
    from genloop.models.text_to_image import TextToImage
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 2048  # images the autoencoder's scaling factor is measured on
ENCODE_BATCH = 256

Batch = dict[str, "Tensor"]


# --------------------------------------------------------------------- autoencoder_kl


def autoencoder_network(
    ws: Workspace, m: ModelConfig, config: dict[str, Any], images: Tensor
) -> nn.Module:
    """An ``AutoencoderKL`` sized by the dataset, with a spread sample of its training
    images kept for measuring the scaling factor when it is saved."""
    from genloop.models.autoencoder_kl import AutoencoderKLModel

    if m.num_classes is not None:
        raise ConfigError("autoencoder_kl is unconditional: leave model.num_classes unset")
    a = m.autoencoder_kl
    model = AutoencoderKLModel(
        {
            "image_size": config["image_size"],
            "channels": config["channels"],
            "base_channels": config["base_channels"],
            "latent_channels": a.latent_channels,
            "downsample": a.downsample,
            "kl_weight": a.kl_weight,
            "recon_loss": a.recon_loss,
        }
    )
    stride = max(1, images.shape[0] // CALIBRATION_IMAGES)
    model.calibration_images = images[::stride][:CALIBRATION_IMAGES]
    return model


@dataclass(frozen=True)
class AutoencoderBuilder:
    """``autoencoder_kl`` as the loop builds it (see ``families.Builder``)."""

    family: str = "autoencoder_kl"
    sampler: str = "genloop.models.image_generation:load_generator"

    def build_model(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        *,
        trust_pickle: bool = False,
    ) -> BuiltModel:
        return build_model(ws, m, data, device, autoencoder_network)

    def make_objective(
        self, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
    ) -> Any:
        from genloop.train.images import make_objective

        return make_objective(self.family, t, data, model, device)


# ---------------------------------------------------------------------- text_to_image


def captioned_split(data: TrainingData, split: str) -> tuple[Tensor, list[str]] | None:
    """Images (uint8 N×C×H×W) and captions of a split of the dataset, or None."""
    from genloop.data.images import caption_split

    return caption_split(data.dir, split)


def resolve_part(ws: Workspace, ref: str, what: str) -> tuple[Path, str]:
    """A model ref (or local folder) for ``model.diffusion.<what>``: its verified directory
    and the ref to record (the folder's path for a local one)."""
    directory, resolved = base_model_dir(ws, ref)
    return directory, resolved or str(directory)


def load_autoencoder(directory: Path, ref: str) -> Any:
    """The diffusers ``AutoencoderKL`` of an ``autoencoder_kl`` artifact."""
    from genloop.models.autoencoder_kl import FAMILY as AUTOENCODER
    from genloop.models.autoencoder_kl import SETTINGS_FILE

    if not (directory / SETTINGS_FILE).is_file():
        raise ConfigError(f"model.diffusion.latent_vae {ref!r} is not an autoencoder_kl model")
    return AUTOENCODER.load(directory).vae


def load_text_encoder_part(directory: Path, ref: str) -> tuple[Any, Any]:
    """A CLIP text encoder and its tokenizer: from a ``clip`` model (its text tower), or a
    folder with ``text_encoder/`` and ``tokenizer/`` (a text_to_image pipeline, or one made
    by hand)."""
    from genloop.models.text_to_image import load_text_encoder

    if (directory / "text_encoder").is_dir() and (directory / "tokenizer").is_dir():
        return load_text_encoder(directory / "text_encoder", directory / "tokenizer")
    if _recorded_family(directory) == "clip":
        import importlib

        clip: Any = importlib.import_module("genloop.models.clip")  # helper "clip"'s family
        return clip.text_encoder_from_clip(directory)  # type: ignore[no-any-return]
    raise ConfigError(
        f"model.diffusion.text_encoder {ref!r} is neither a clip model nor a folder with "
        "text_encoder/ and tokenizer/"
    )


def _recorded_family(directory: Path) -> str | None:
    try:
        meta = json.loads((directory / "genloop.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    family = meta.get("family") if isinstance(meta, dict) else None
    return family if isinstance(family, str) else None


def build_unet_model(
    ws: Workspace, m: ModelConfig, data: TrainingData, device: torch.device
) -> BuiltModel:
    """A fresh UNet over the frozen autoencoder and text encoder the model section names,
    or ``model.base_model`` (a text_to_image version) to continue."""
    from genloop.models.family import get_family
    from genloop.models.text_to_image import TextToImage, build_text_to_image

    train = captioned_split(data, "train")
    if train is None:
        raise GenloopError(
            f"dataset {data.ref} has no captions: text_to_image trains on an image dataset "
            "whose records carry text (captions.json)"
        )
    images, _ = train
    if m.base_model is not None:
        base_dir, parent = base_model_dir(ws, m.base_model)
        loaded = get_family("text_to_image").load(base_dir, device=device)
        assert isinstance(loaded, TextToImage)
        loaded.train()
        _check_size(loaded, images)
        if m.lora is not None:
            return BuiltModel(with_lora(loaded, m.lora), dict(loaded.config), parent)
        return BuiltModel(loaded, dict(loaded.config), parent)
    d = m.diffusion
    if d.latent_vae is None or d.text_encoder is None:
        raise ConfigError(
            "text_to_image needs model.diffusion.latent_vae (an autoencoder_kl model) and "
            "model.diffusion.text_encoder (a clip model) to train the UNet over"
        )
    vae_dir, vae_ref = resolve_part(ws, d.latent_vae, "latent_vae")
    text_dir, text_ref = resolve_part(ws, d.text_encoder, "text_encoder")
    vae = load_autoencoder(vae_dir, d.latent_vae)
    encoder, tokenizer = load_text_encoder_part(text_dir, d.text_encoder)
    config = {
        "base_channels": m.base_channels,
        "timesteps": d.timesteps,
        "beta_schedule": d.beta_schedule,
        "sampler": d.sampler,
        "sample_steps": d.sample_steps,
        "guidance_scale": d.guidance_scale,
        "cond_drop_prob": d.cond_drop_prob,
        "latent_vae": vae_ref,
        "text_encoder": text_ref,
    }
    model = build_text_to_image(config, vae, encoder, tokenizer)
    _check_size(model, images)
    return BuiltModel(model.to(device), dict(model.config), None)


def with_lora(pipeline: TextToImage, lora: LoraConfig) -> nn.Module:
    """``model.lora`` on a base pipeline: LoRA adapters on the UNet's attention projections
    (``lora.target_modules``, else to_q, to_k, to_v, to_out.0), everything else frozen; the
    loop's export merges them into the UNet (see ``models/text_to_image_lora.py``)."""
    from genloop.models.text_to_image_lora import LoraTextToImage

    if lora.load_in_4bit:
        raise ConfigError(
            "model.lora.load_in_4bit is for text models; a text_to_image base is not quantized"
        )
    return LoraTextToImage(
        pipeline,
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=lora.target_modules,
    )


def _check_size(model: TextToImage, images: Tensor) -> None:
    _, channels, height, width = images.shape
    if (channels, height, width) != (model.channels, model.image_size, model.image_size):
        raise ConfigError(
            f"the autoencoder makes {model.channels}×{model.image_size}×{model.image_size} "
            f"images, the dataset holds {channels}×{height}×{width}"
        )


@dataclass
class TextToImageObjective:
    """Batches of posterior latents and caption tokens; the UNet's ε-prediction loss."""

    name: str
    model: TextToImage  # the unwrapped model: its frozen parts encode, its draw() samples
    mu: Tensor  # (N, 4, h, w) the training images' posterior means (CPU)
    std: Tensor  # (N, 4, h, w) and standard deviations
    ids: Tensor  # (N, L) caption token ids
    val_mu: Tensor
    val_std: Tensor
    val_ids: Tensor
    empty_ids: Tensor  # (L,) the empty prompt's ids (caption dropout)
    scale: float  # the autoencoder's scaling factor
    batch_size: int
    seed: int
    device: torch.device

    def _batch(
        self, mu: Tensor, std: Tensor, ids: Tensor, g: torch.Generator, train: bool
    ) -> Batch:
        import torch

        r = self.model.draw(mu.shape[0], g)
        drop = r["drop"] if train else torch.zeros_like(r["drop"])
        batch = {
            "latents": (mu + std * r["eps"]) * self.scale,
            "input_ids": torch.where(drop[:, None], self.empty_ids[None, :], ids),
            "noise": r["noise"],
            "timesteps": r["timesteps"],
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        batches = seeded_batches(
            len(self.mu), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for idx, g in batches:
            yield self._batch(self.mu[idx], self.std[idx], self.ids[idx], g, train=True)

    def val_batches(self, n: int) -> list[Batch]:
        windows = val_windows(len(self.val_mu), n, self.batch_size, self.seed)
        return [
            self._batch(self.val_mu[w], self.val_std[w], self.val_ids[w], g, train=False)
            for w, g in windows
        ]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        from genloop.models.text_to_image import FAMILY

        return FAMILY.loss(model, batch), int(batch["latents"].shape[0])


def encode_split(model: TextToImage, images: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """The autoencoder's posterior (μ, σ) of uint8 images, on the CPU."""
    import torch

    from genloop.data.images import normalize

    mus, stds = [], []
    for i in range(0, images.shape[0], ENCODE_BATCH):
        mu, std = model.encode_images(normalize(images[i : i + ENCODE_BATCH]).to(device))
        mus.append(mu.float().cpu())
        stds.append(std.float().cpu())
    if not mus:
        empty = torch.zeros(0, *model.latent_shape)
        return empty, empty
    return torch.cat(mus), torch.cat(stds)


def make_unet_objective(
    t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> TextToImageObjective:
    import torch

    from genloop.models.text_to_image import TextToImage

    if t.objective != "text_to_image":
        raise wrong_family(t.objective)
    if not isinstance(model, TextToImage):
        raise GenloopError(f"{type(model).__name__} is not a genloop text_to_image model")
    a = t.augment
    if a.flip or a.crop_padding or a.jitter:
        raise ConfigError(
            "text_to_image trains on cached latents and captions that name positions: leave "
            "train.augment off"
        )
    train = captioned_split(data, "train")
    if train is None:
        raise GenloopError(f"dataset {data.ref} has no captions")
    val = captioned_split(data, "val")
    images, captions = train
    val_images, val_captions = val if val is not None else (images[:0], [])
    log.info("encoding %d training images with the frozen autoencoder", images.shape[0])
    with torch.no_grad():
        mu, std = encode_split(model, images, device)
        val_mu, val_std = encode_split(model, val_images, device)
    return TextToImageObjective(
        name="text_to_image",
        model=model,
        mu=mu,
        std=std,
        ids=model.tokenize(captions),
        val_mu=val_mu,
        val_std=val_std,
        val_ids=(
            model.tokenize(val_captions)
            if val_captions
            else torch.zeros(0, model.context, dtype=torch.long)
        ),
        empty_ids=model.tokenize([""])[0],
        scale=model.scaling_factor,
        batch_size=t.batch_size,
        seed=t.seed,
        device=torch.device(device),
    )


@dataclass(frozen=True)
class TextToImageBuilder:
    """``text_to_image`` as the loop builds it (see ``families.Builder``)."""

    family: str = "text_to_image"
    sampler: str = "genloop.models.text_to_image:load_text_to_image"

    def build_model(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        *,
        trust_pickle: bool = False,  # every part is read from safetensors
    ) -> BuiltModel:
        return build_unet_model(ws, m, data, device)

    def make_objective(
        self, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
    ) -> TextToImageObjective:
        from genloop.models.text_to_image_lora import base_pipeline

        return make_unet_objective(t, data, base_pipeline(model), device)


BUILDERS = {
    "autoencoder_kl": AutoencoderBuilder(),
    "text_to_image": TextToImageBuilder(),
}
