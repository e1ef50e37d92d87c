"""The ``text_to_image`` family: Stable Diffusion's architecture (Rombach et al., 2022) at
small scale: a diffusers ``UNet2DConditionModel`` that denoises the latents of a frozen
``AutoencoderKL`` (family ``autoencoder_kl``), conditioned by cross-attention on the
``last_hidden_state`` of a frozen CLIP text encoder (``CLIPTextModel``).

Training (ε-prediction, Ho et al., 2020)::

    z_0 = s · (μ + σ·ε')  of the autoencoder's posterior, s = its scaling_factor    (B, 4, h, w)
    c   = E_text(tokens(caption)), the empty prompt with probability cond_drop_prob  (B, L, D)
    t ~ U{0 … T-1},  ε ~ N(0, I),  z_t = √ᾱ_t · z_0 + √(1 - ᾱ_t) · ε
    L = ‖ε_θ(z_t, t, c) - ε‖²

Sampling (classifier-free guidance, Ho & Salimans, 2022, with negative prompts): the
unconditional (or negative) and the prompt's context run as one UNet batch each step,
ε̂ = ε_θ(z_t, t, c_neg) + w · (ε_θ(z_t, t, c) - ε_θ(z_t, t, c_neg)), then one DDPM, DDIM or
DPM-Solver++ step; the image is the autoencoder's decode of z_0 / s. :meth:`TextToImage.generate`
follows ``diffusers.StableDiffusionPipeline.__call__`` step for step (same random draws,
same order), so the same seed, scheduler and steps give the same images. It skips work
that repeats: the text encoder runs once over the distinct prompts, the cross-attention
keys and values of the (constant) text context are projected once instead of at every
step, and self-attention projects q, k and v in one matmul.

Artifact (diffusers pipeline layout; ``StableDiffusionPipeline.from_pretrained(dir,
safety_checker=None)`` loads it)::

    model_index.json       the parts, the tokenizer named as transformers' fast tokenizer
    unet/                  UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
    vae/                   AutoencoderKL, its config holding scaling_factor
    text_encoder/          CLIPTextModel (config.json + model.safetensors)
    tokenizer/             tokenizer.json …, model_max_length = the encoder's context
    scheduler/             the default sampler's scheduler (the training noise schedule)
    text_to_image.json     genloop's settings: sampler, steps, guidance, lineage refs

Config dict keys: ``base_channels``, ``layers_per_block``, ``timesteps``, ``beta_schedule``
(``scaled_linear`` is SD's, β from 0.00085 to 0.012), ``sampler`` (ddpm, ddim, dpm),
``sample_steps``, ``guidance_scale``, ``cond_drop_prob``, ``latent_vae`` and
``text_encoder`` (model refs, for lineage).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genloop.errors import ConfigError, GenloopError
from genloop.models.autoencoder_kl import load_diffusers_weights
from genloop.models.family import Family, count_parameters
from genloop.models.image_io import check_dtype, read_settings, verify_dir

log = logging.getLogger(__name__)

FORMAT = "genloop-text-to-image"
SETTINGS_FILE = "text_to_image.json"
DEFAULTS: dict[str, Any] = {
    "base_channels": 32,
    "layers_per_block": 1,
    "timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "sampler": "ddim",
    "sample_steps": 25,
    "guidance_scale": 4.0,
    "cond_drop_prob": 0.1,
    "latent_vae": None,
    "text_encoder": None,
}
Sampler = Literal["ddpm", "ddim", "dpm"]
SCHEDULERS: dict[str, str] = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
MAX_IMAGES = 256  # per generate call
MAX_PROMPT_CHARS = 2000


def _diffusers() -> Any:
    import diffusers

    return diffusers


def unet_config(
    base: int, latent_channels: int, latent_size: int, cross_dim: int, layers: int
) -> dict[str, Any]:
    """A small ``UNet2DConditionModel`` for (latent_channels, s, s) latents: one level per
    stride-2 step down to 4 pixels, widths b, 2b, 2b…, cross-attention on the text at every
    level (SD skips its lowest one; at 8×8 latents every level is cheap), one head per 32
    channels."""
    from genloop.models.image_io import down_levels

    levels, _ = down_levels(latent_size)
    widths = tuple(base * min(2**i, 2) for i in range(levels + 1))
    n = len(widths)
    return {
        "sample_size": latent_size,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "layers_per_block": layers,
        "block_out_channels": widths,
        "down_block_types": ("CrossAttnDownBlock2D",) * n,
        "up_block_types": ("CrossAttnUpBlock2D",) * n,
        "norm_num_groups": math.gcd(base, 32),
        "cross_attention_dim": cross_dim,
        # diffusers reads this as the number of heads (a documented misnomer)
        "attention_head_dim": tuple(max(1, w // 32) for w in widths),
    }


def scheduler_config(timesteps: int, beta_schedule: str) -> dict[str, Any]:
    """The training noise schedule as every sampler's scheduler reads it: SD's β range for
    ``scaled_linear``; "trailing" timesteps, so few-step sampling starts at t = T - 1."""
    betas = {"beta_start": 0.00085, "beta_end": 0.012} if beta_schedule == "scaled_linear" else {}
    return {
        "num_train_timesteps": timesteps,
        "beta_schedule": beta_schedule,
        **betas,
        "prediction_type": "epsilon",
        "clip_sample": False,  # latents are not bounded
        "set_alpha_to_one": True,
        "steps_offset": 1,  # what the SD pipeline expects; unused with trailing spacing
        "timestep_spacing": "trailing",
    }


def make_scheduler(sampler: str, config: Mapping[str, Any]) -> Any:
    if sampler not in SCHEDULERS:
        raise GenloopError(f"unknown sampler {sampler!r} (choose from: ddpm, ddim, dpm)")
    return getattr(_diffusers(), SCHEDULERS[sampler]).from_config(dict(config))


def fit_tokenizer(tokenizer: Any, context: int) -> Any:
    """The tokenizer as SD's pipeline calls it: padding to ``model_max_length`` = the text
    encoder's context, with a pad token (the end-of-text one when it has none)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise GenloopError("the text encoder's tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = context
    tokenizer.init_kwargs["model_max_length"] = context
    return tokenizer


class TextToImage(nn.Module):
    """The loaded (or training) pipeline parts and genloop's own sampling loop.

    ``forward`` returns the training loss (so DDP can wrap it); :meth:`generate` samples.
    Only the UNet trains: the autoencoder and the text encoder are frozen.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        schedule: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {**DEFAULTS, **config}
        c = self.config
        if c["sampler"] not in SCHEDULERS:
            raise ConfigError(f"unknown sampler {c['sampler']!r} (choose from: ddpm, ddim, dpm)")
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        self.context = int(text_encoder.config.max_position_embeddings)
        self.tokenizer = fit_tokenizer(tokenizer, self.context)
        if int(unet.config.cross_attention_dim) != int(text_encoder.config.hidden_size):
            raise GenloopError(
                f"the UNet attends to {unet.config.cross_attention_dim}-wide text states, the "
                f"text encoder makes {text_encoder.config.hidden_size}"
            )
        if int(unet.config.in_channels) != int(vae.config.latent_channels):
            raise GenloopError(
                f"the UNet takes {unet.config.in_channels} channels, the autoencoder's latents "
                f"have {vae.config.latent_channels}"
            )
        # the default sampler's scheduler config: what the pipeline's scheduler/ holds
        base = scheduler_config(int(c["timesteps"]), c["beta_schedule"])
        default = make_scheduler(c["sampler"], schedule if schedule is not None else base)
        self.schedule: dict[str, Any] = dict(default.config)
        self.noise: Any = _diffusers().DDPMScheduler.from_config(self.schedule)  # training
        install_sampling_attention(unet)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_shape = (
            int(unet.config.in_channels),
            int(unet.config.sample_size),
            int(unet.config.sample_size),
        )
        self.image_size = self.latent_shape[1] * self.vae_scale
        self.channels = int(vae.config.out_channels)
        self._empty_ids: Tensor | None = None

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def train(self, mode: bool = True) -> TextToImage:
        super().train(mode)
        self.vae.eval()  # frozen
        self.text_encoder.eval()
        return self

    # ------------------------------------------------------------------ training

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids (N, L) as the pipeline makes them: padded and truncated to L."""
        ids: Tensor = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.context,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The autoencoder's posterior (μ, σ), each (B, 4, h, w), of images in [-1, 1]."""
        dist = self.vae.encode(images).latent_dist
        return dist.mean, dist.std

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random inputs of one training batch (CPU): ε' for the posterior sample,
        ε and t for the forward process, and the caption-drop mask."""
        return {
            "eps": torch.randn(batch_size, *self.latent_shape, generator=generator),
            "noise": torch.randn(batch_size, *self.latent_shape, generator=generator),
            "timesteps": torch.randint(
                0, int(self.config["timesteps"]), (batch_size,), generator=generator
            ),
            "drop": torch.rand(batch_size, generator=generator)
            < float(self.config["cond_drop_prob"]),
        }

    def forward(
        self, latents: Tensor, input_ids: Tensor, *, noise: Tensor, timesteps: Tensor
    ) -> Tensor:
        """The ε-prediction MSE of one batch of scaled latents (B, 4, h, w) and their
        token ids (B, L) (the empty prompt's where captions were dropped)."""
        with torch.no_grad():
            context = self.text_encoder(input_ids)[0]  # (B, L, D)
        zt = self.noise.add_noise(latents, noise, timesteps)
        pred = self.unet(zt, timesteps, encoder_hidden_states=context, return_dict=False)[0]
        return F.mse_loss(pred.float(), noise.float())

    # ------------------------------------------------------------------ sampling

    def truncations(self, texts: Sequence[str]) -> list[str]:
        """A warning for each text longer than the text encoder's context of L tokens."""
        notes = []
        full = self.tokenizer(list(texts), add_special_tokens=True).input_ids
        plain = self.tokenizer(list(texts), add_special_tokens=False).input_ids
        for text, ids, words in zip(texts, full, plain, strict=True):
            if len(ids) > self.context:
                # truncation keeps the special tokens (CLIP pools at the end token): the
                # words past what is left of the context are the ones dropped
                kept = self.context - (len(ids) - len(words))
                dropped = self.tokenizer.decode(words[kept:])
                notes.append(
                    f"the prompt {_short(text)!r} is {len(ids)} tokens long; the text encoder "
                    f"reads {self.context}, so {dropped!r} was ignored"
                )
        return notes

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> Tensor:
        """The text encoder's last hidden states (N, L, D) of ``texts``, each distinct text
        encoded once."""
        unique = list(dict.fromkeys(texts))
        device = self.unet.device
        states = self.text_encoder(self.tokenize(unique).to(device))[0]
        index = torch.tensor([unique.index(t) for t in texts], device=device)
        out: Tensor = states.index_select(0, index)
        return out

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        negative_prompts: Sequence[str] | None = None,
        n: int = 1,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: Sampler | None = None,
        warnings: list[str] | None = None,
        refuse_long_prompts: bool = False,
    ) -> Tensor:
        """``n`` images per prompt, uint8 (len(prompts)·n, 3, H, W), prompt-major like the
        pipeline's ``num_images_per_prompt``. A prompt longer than the text encoder's
        context is truncated and a note appended to ``warnings`` (refused with
        ``refuse_long_prompts``). Randomness comes only from a generator seeded by ``seed``
        (drawn when None), used exactly as the diffusers pipeline uses it."""
        from genloop.data.images import to_uint8

        prompts, negatives = self._check(prompts, negative_prompts, n)
        c = self.config
        sampler = sampler or c["sampler"]
        steps = int(steps or c["sample_steps"])
        w = float(c["guidance_scale"] if guidance_scale is None else guidance_scale)
        if not 1 <= steps <= int(c["timesteps"]):
            raise GenloopError(f"steps must be between 1 and {c['timesteps']}, not {steps}")
        if not 0.0 <= w <= 100.0:
            raise GenloopError(f"guidance_scale must be between 0 and 100, not {w}")
        if seed is None:
            seed = secrets.randbits(63)
        elif not 0 <= seed < 2**63:
            raise GenloopError(f"seed must be between 0 and 2^63 - 1, not {seed}")
        notes = self.truncations(list(dict.fromkeys([*prompts, *negatives])))
        if notes and refuse_long_prompts:
            raise GenloopError(notes[0])
        if warnings is not None:
            warnings.extend(notes)
        for note in notes:
            log.warning(note)

        # 1. the text context, (2·B·n, L, D) with guidance: [negatives…, prompts…]
        guided = w > 1.0
        each = [p for p in prompts for _ in range(n)]
        texts = [q for q in negatives for _ in range(n)] + each if guided else each
        context = self.encode_prompts(texts)
        # 2. the scheduler and the initial latents from the seeded generator
        device = self.unet.device
        generator = torch.Generator().manual_seed(seed)
        scheduler = make_scheduler(sampler, self.schedule)
        scheduler.set_timesteps(steps, device=device)
        shape = (len(each), *self.latent_shape)
        latents = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(device)
        latents = latents * scheduler.init_noise_sigma
        kwargs: dict[str, Any] = {"generator": generator}
        if sampler == "ddim":
            kwargs["eta"] = 0.0
        # 3. the denoising loop: one UNet call per step, the attention caches on
        with sampling_cache():
            for t in scheduler.timesteps:
                x = torch.cat([latents, latents]) if guided else latents
                x = scheduler.scale_model_input(x, t)
                eps = self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
                if guided:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + w * (eps_c - eps_u)
                latents = scheduler.step(eps, t, latents, **kwargs, return_dict=False)[0]
        # 4. decode
        images = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return to_uint8(images.float().cpu().clamp(-1.0, 1.0))

    def _check(
        self, prompts: Sequence[str], negatives: Sequence[str] | None, n: int
    ) -> tuple[list[str], list[str]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise GenloopError("no prompts to draw")
        if n < 1 or len(prompts) * n > MAX_IMAGES:
            raise GenloopError(f"n must be at least 1, and prompts × n at most {MAX_IMAGES}")
        if negatives is None:
            negatives = [""] * len(prompts)
        elif isinstance(negatives, str):
            negatives = [negatives] * len(prompts)
        negatives = list(negatives)
        if len(negatives) != len(prompts):
            raise GenloopError(
                f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per "
                "prompt, or one for all"
            )
        for text in [*prompts, *negatives]:
            if not isinstance(text, str):
                raise GenloopError(f"a prompt must be text, not {type(text).__name__}")
            if len(text) > MAX_PROMPT_CHARS:
                raise GenloopError(f"a prompt is longer than {MAX_PROMPT_CHARS} characters")
        return prompts, negatives


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_sampling = threading.local()  # .layers: {id(attn): cached tensors} while generate runs


class _SamplingAttention:
    """An attention processor for the UNet's transformer blocks that, while a sampling
    cache is active on this thread (:func:`sampling_cache`, inside ``generate``), skips work
    that repeats at every denoising step; otherwise (training) it is the layer's own one.

    - cross-attention (``attn2``): the text context is the same at every step, so its keys
      and values are projected once per layer and reused;
    - self-attention (``attn1``): q, k and v come from one matmul with the three weights
      stacked (stacked once per call of ``generate``).

    With the cache it computes what diffusers' ``AttnProcessor2_0`` computes for a layer
    without mask, norms or residual (those of UNet2DConditionModel's transformer blocks),
    so the outputs are the same up to float rounding.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        layers: dict[int, tuple[Tensor, ...]] | None = getattr(_sampling, "layers", None)
        if layers is None or attention_mask is not None or hidden_states.ndim != 3:
            out: Tensor = self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
            return out
        b, heads = hidden_states.shape[0], attn.heads
        cached = layers.get(id(attn))
        if encoder_hidden_states is None:  # self-attention: one stacked projection
            if cached is None:
                weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
                bias = None
                if attn.to_q.bias is not None:
                    bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
                cached = layers[id(attn)] = (weight,) if bias is None else (weight, bias)
            q, k, v = F.linear(hidden_states, *cached).chunk(3, dim=-1)  # (B, N, inner) each
            d = q.shape[-1] // heads
            q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
        else:  # cross-attention: K, V of the unchanged context, once
            if cached is None or cached[0] is not encoder_hidden_states:
                ctx = encoder_hidden_states
                k, v = attn.to_k(ctx), attn.to_v(ctx)  # (B, L, inner)
                d = k.shape[-1] // heads
                k = k.view(b, -1, heads, d).transpose(1, 2)  # (B, heads, L, d)
                v = v.view(b, -1, heads, d).transpose(1, 2)
                cached = layers[id(attn)] = (ctx, k, v)
            _, k, v = cached
            q = attn.to_q(hidden_states)
            d = q.shape[-1] // heads
            q = q.view(b, -1, heads, d).transpose(1, 2)  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        scaled: Tensor = out / attn.rescale_output_factor
        return scaled


@contextmanager
def sampling_cache() -> Iterator[None]:
    """Within the block, on this thread, the UNet's attention layers reuse what does not
    change between denoising steps (see :class:`_SamplingAttention`)."""
    previous = getattr(_sampling, "layers", None)
    _sampling.layers = {}
    try:
        yield
    finally:
        _sampling.layers = previous


def install_sampling_attention(unet: Any) -> None:
    """Give the UNet's plain attention layers the caching processor (once)."""
    for name, module in unet.named_modules():
        plain = name.endswith(("attn1", "attn2")) and _plain_attention(module)
        if plain and not isinstance(module.processor, _SamplingAttention):
            module.processor = _SamplingAttention(module.processor)


def _plain_attention(attn: Any) -> bool:
    return bool(
        attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_cross is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
    )


# ---------------------------------------------------------------------------- building


def build_text_to_image(
    config: Mapping[str, Any], vae: Any, text_encoder: Any, tokenizer: Any
) -> TextToImage:
    """A fresh UNet (seed torch first for a reproducible one) over the given frozen parts:
    ``vae`` a diffusers ``AutoencoderKL`` (its scaling_factor set), ``text_encoder`` a
    ``CLIPTextModel``, ``tokenizer`` its fast tokenizer."""
    c = {**DEFAULTS, **config}
    side = int(vae.config.sample_size) // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = _diffusers().UNet2DConditionModel(
        **unet_config(
            int(c["base_channels"]),
            int(vae.config.latent_channels),
            side,
            int(text_encoder.config.hidden_size),
            int(c["layers_per_block"]),
        )
    )
    return TextToImage(c, unet, vae, text_encoder, tokenizer)


def load_text_encoder(text_encoder_dir: Path, tokenizer_dir: Path) -> tuple[Any, Any]:
    """A ``CLIPTextModel`` (safetensors) and its fast tokenizer from local folders."""
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        encoder: Any = CLIPTextModel.from_pretrained(
            str(text_encoder_dir), local_files_only=True, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise GenloopError(f"cannot load the text encoder in {text_encoder_dir}: {exc}") from None
    return encoder.eval(), tokenizer


class TextToImageFamily:
    """The ``text_to_image`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "text_to_image"

    def build(self, config: Mapping[str, Any]) -> TextToImage:
        """A fresh UNet over the parts in ``config``: ``vae_dir`` (an ``autoencoder_kl``
        artifact), ``text_encoder_dir`` and ``tokenizer_dir``."""
        from genloop.models.autoencoder_kl import FAMILY as AUTOENCODER

        missing = [k for k in ("vae_dir", "text_encoder_dir", "tokenizer_dir") if k not in config]
        if missing:
            raise ConfigError(
                f"a text_to_image model is built over trained parts: the config needs "
                f"{', '.join(missing)}"
            )
        vae = AUTOENCODER.load(Path(config["vae_dir"])).vae
        encoder, tokenizer = load_text_encoder(
            Path(config["text_encoder_dir"]), Path(config["tokenizer_dir"])
        )
        rest = {k: v for k, v in config.items() if not k.endswith("_dir")}
        return build_text_to_image(rest, vae, encoder, tokenizer)

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = model(
            batch["latents"],
            batch["input_ids"],
            noise=batch["noise"],
            timesteps=batch["timesteps"],
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
        """The diffusers pipeline layout (``tokenizer_dir``, the dataset's, is not used: the
        text encoder brings its own tokenizer)."""
        from genloop.models.image_io import prepare_out, write_settings

        if not isinstance(model, TextToImage):
            raise GenloopError(f"expected a TextToImage model, got {type(model).__name__}")
        out = Path(out_dir)
        prepare_out(out)
        d = _diffusers()
        model.unet.save_pretrained(out / "unet", safe_serialization=True)
        model.vae.save_pretrained(out / "vae", safe_serialization=True)
        model.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        model.tokenizer.save_pretrained(str(out / "tokenizer"))
        _fix_tokenizer_config(out / "tokenizer", model.tokenizer)
        scheduler = make_scheduler(model.config["sampler"], model.schedule)
        scheduler.save_pretrained(out / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": d.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", type(scheduler).__name__],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_settings(out, SETTINGS_FILE, FORMAT, model.config, extra)
        return out

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> TextToImage:
        check_dtype(dtype)
        path = Path(path)
        verify_dir(path)
        config = read_settings(path, SETTINGS_FILE, FORMAT)
        d = _diffusers()
        parts = {}
        for name in ("unet", "vae", "scheduler"):
            file = "scheduler_config.json" if name == "scheduler" else "config.json"
            try:
                parts[name] = json.loads((path / name / file).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise GenloopError(f"{path}/{name}: unreadable {file} ({exc})") from None
        unet = d.UNet2DConditionModel.from_config(_public(parts["unet"]))
        load_diffusers_weights(unet, path / "unet", ("block_out_channels", "cross_attention_dim"))
        vae = d.AutoencoderKL.from_config(_public(parts["vae"]))
        load_diffusers_weights(vae, path / "vae", ("block_out_channels", "latent_channels"))
        encoder, tokenizer = load_text_encoder(path / "text_encoder", path / "tokenizer")
        model = TextToImage(config, unet, vae, encoder, tokenizer, _public(parts["scheduler"]))
        return model.to(device).eval()

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config without its bookkeeping keys (``_class_name``, …)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _fix_tokenizer_config(directory: Path, tokenizer: Any) -> None:
    """Make the saved tokenizer config say what the pipeline needs: the pad token and
    ``model_max_length`` = the text encoder's context (so padding="max_length" pads to it)."""
    file = directory / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    config["model_max_length"] = int(tokenizer.model_max_length)
    config["pad_token"] = tokenizer.pad_token
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_text_to_image(path: str | Path, *, device: str | torch.device = "cpu") -> TextToImage:
    """The text-to-image pipeline in ``path`` (verified when it has a manifest)."""
    model = FAMILY.load(path, device=device)
    assert isinstance(model, TextToImage)
    return model.requires_grad_(False)


FAMILY: Family = TextToImageFamily()
