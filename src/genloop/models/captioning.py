"""The captioning family: image → text with transformers' ``VisionEncoderDecoderModel``.

    encoder   ViT: pixels (B, C, H, W) in [-1, 1] → [CLS] + (H/p)·(W/p) patches → (B, 1 + N, d)
    decoder   GPT-2 with cross-attention over the encoder states: tokens (B, T) → logits (B, T, V)

Training is teacher-forced: the decoder reads the caption shifted right behind
``decoder_start_token_id`` (the tokenizer's bos; genloop's BPE uses ``<|endoftext|>`` for
both bos and eos) and learns, by cross-entropy, each caption token and the eos after it.
Captioning is greedy (or beam) search from the start token until eos (:func:`caption`).

Config dict keys: ``image_size``, ``channels``, ``vocab_size`` (required); ``preset``
(tiny, small), ``n_layer`` (decoder layers), ``n_encoder_layer`` (default: ``n_layer``),
``n_embd`` and ``n_head`` (shared by both halves, so cross-attention needs no projection),
``intermediate_size`` (default 4·``n_embd``), ``patch_size`` (default: the largest divisor
of the image side up to side/8, so 32 → 4), ``context_length`` (decoder positions, default
64), ``dropout``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id``.

=========  ==========  ==========  ======  ======  ======================
preset     enc. lay.   dec. lay.   n_embd  n_head  parameters (V 512, 32²)
=========  ==========  ==========  ======  ======  ======================
``tiny``            2           2     128       4                 ~1.0M
``small``           4           4     256       8                 ~7.6M
=========  ==========  ==========  ======  ======  ======================

Artifact (Hugging Face layout: ``VisionEncoderDecoderModel.from_pretrained(dir)``,
``AutoTokenizer`` and ``AutoImageProcessor`` load it): ``config.json``, ``model.safetensors``,
``generation_config.json``, ``preprocessor_config.json`` (a ``ViTImageProcessor`` that maps
pixels to [-1, 1] at the model's size), the tokenizer files and ``genloop.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genloop.data.tokenizer import TOKENIZER_FILES
from genloop.errors import ConfigError, ConflictError, GenloopError, NotFoundError
from genloop.models.family import Family, count_parameters
from genloop.models.image_io import MAX_IMAGE_SIZE, check_dtype, verify_dir
from genloop.models.token_loss import IGNORE_INDEX, token_loss
from genloop.workspace.layout import GENLOOP_JSON, SAFETENSORS

if TYPE_CHECKING:
    from transformers import (
        PreTrainedTokenizerBase,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

MODEL_TYPE = "vision-encoder-decoder"
PREPROCESSOR_FILE = "preprocessor_config.json"
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 8},
}
OVERRIDES = (
    "n_layer",
    "n_encoder_layer",
    "n_embd",
    "n_head",
    "intermediate_size",
    "patch_size",
    "context_length",
    "dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
REQUIRED = ("image_size", "channels", "vocab_size")
DEFAULT_CONTEXT = 64
BATCH_KEYS = ("pixel_values", "labels")


@dataclass(frozen=True)
class CaptioningSpec:
    """A complete ViT + GPT-2 architecture in genloop's names (see ``to_hf_config``)."""

    image_size: int
    channels: int
    vocab_size: int
    patch_size: int
    n_layer: int  # decoder layers
    n_encoder_layer: int
    n_embd: int
    n_head: int
    intermediate_size: int
    context_length: int = DEFAULT_CONTEXT
    dropout: float = 0.0
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tohf_config(self) -> VisionEncoderDecoderConfig:
        from transformers import GPT2Config, VisionEncoderDecoderConfig, ViTConfig

        encoder = ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.channels,
            hidden_size=self.n_embd,
            num_hidden_layers=self.n_encoder_layer,
            num_attention_heads=self.n_head,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
        )
        decoder = GPT2Config(
            vocab_size=self.vocab_size,
            n_positions=self.context_length,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.intermediate_size,
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            add_cross_attention=True,
            is_decoder=True,  # type: ignore[call-arg]  # a PreTrainedConfig field
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        config = VisionEncoderDecoderConfig(encoder=encoder.to_dict(), decoder=decoder.to_dict())
        config.decoder_start_token_id = self.bos_token_id
        config.bos_token_id = self.bos_token_id
        config.eos_token_id = self.eos_token_id
        config.pad_token_id = self.pad_token_id
        return config


def default_patch_size(image_size: int) -> int:
    """The largest divisor of ``image_size`` up to ``image_size // 8``: 32 → 4, 28 → 2, 64 → 8."""
    limit = max(1, image_size // 8)
    return max(p for p in range(1, limit + 1) if image_size % p == 0)


def spec_from_config(config: Mapping[str, Any]) -> CaptioningSpec:
    """A spec from a plain config dict (see the module docstring); None counts as not given."""
    values = {k: v for k, v in config.items() if v is not None}
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        raise ConfigError(f"captioning model config is missing {', '.join(missing)}")
    preset = values.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(f"unknown captioning preset {preset!r} (presets: {', '.join(PRESETS)})")
    unknown = [k for k in values if k not in (*REQUIRED, *OVERRIDES)]
    if unknown:
        raise ConfigError(
            f"unknown captioning setting {unknown[0]!r} "
            f"(valid: preset, {', '.join((*REQUIRED, *OVERRIDES))})"
        )
    values = {**PRESETS[preset], **values}
    values.setdefault("n_encoder_layer", values["n_layer"])
    values.setdefault("intermediate_size", 4 * values["n_embd"])
    for key in ("image_size", "vocab_size", "n_layer", "n_encoder_layer", "n_embd", "n_head"):
        _check_int(key, values[key])
    for key in ("intermediate_size", "context_length"):
        if key in values:
            _check_int(key, values[key])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in values:
            _check_int(key, values[key], minimum=0)
            if values[key] >= values["vocab_size"]:
                raise ConfigError(f"{key} {values[key]} is outside the vocabulary")
    size = values["image_size"]
    if size > MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size must be at most {MAX_IMAGE_SIZE}, not {size}")
    if values["channels"] not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, not {values['channels']}")
    values.setdefault("patch_size", default_patch_size(size))
    _check_int("patch_size", values["patch_size"])
    if size % values["patch_size"]:
        raise ConfigError(f"patch_size {values['patch_size']} does not divide image_size {size}")
    if values["n_embd"] % values["n_head"]:
        raise ConfigError(
            f"n_embd ({values['n_embd']}) must be divisible by n_head ({values['n_head']})"
        )
    dropout = values.get("dropout", 0.0)
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a number in [0, 1) (got {dropout!r})")
    return CaptioningSpec(**values)


# --------------------------------------------------------------------------------- run


def pixel_values(model: nn.Module, images: Tensor) -> Tensor:
    """uint8 images (N, C, H, W) → float pixels in [-1, 1] at the encoder's size and channels,
    on the model's device. Another size is resized (bilinear, antialiased); grey ↔ RGB is
    converted, so any decoded image can be captioned."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise GenloopError(
            f"images must be uint8 N×C×H×W, got {images.dtype} {tuple(images.shape)}"
        )
    enc = hf_config(model).encoder
    size, channels = int(enc.image_size), int(enc.num_channels)
    x = images.float() / 127.5 - 1.0  # genloop.data.images.normalize
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif x.shape[1] in (3, 4) and channels == 1:
            x = x[:, :3].mean(dim=1, keepdim=True)
        elif x.shape[1] == 4 and channels == 3:
            x = x[:, :3]
        else:
            raise GenloopError(f"cannot caption {x.shape[1]}-channel images")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        x = x.clamp(-1.0, 1.0)
    return x.to(next(model.parameters()).device)


def shift_right(labels: Tensor, start_id: int, pad_id: int) -> Tensor:
    """The decoder's input under teacher forcing: ``[start] + labels[:-1]``, -100 → pad."""
    inputs = labels.new_full(labels.shape, pad_id)
    inputs[:, 1:] = labels[:, :-1]
    inputs[:, 0] = start_id
    return inputs.masked_fill(inputs == IGNORE_INDEX, pad_id)


def caption_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    label_smoothing: float = 0.0,
    z_loss_coef: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Teacher-forced cross-entropy of the caption tokens given the image.

    ``batch``: ``pixel_values`` (B, C, H, W) in [-1, 1]; ``labels`` (B, T), the caption's
    token ids and its eos, -100 after it.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise GenloopError(
            f"a captioning batch needs {' and '.join(missing)} (got keys: {', '.join(batch)})"
        )
    labels = batch["labels"]
    cfg = hf_config(model)
    decoder_input_ids = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
    # the padding after a caption: masking it changes no logit the loss reads (attention is
    # causal), but says which inputs are padding, as transformers asks
    mask = torch.ones_like(labels)
    mask[:, 1:] = labels[:, :-1] != IGNORE_INDEX
    logits: Tensor = model(
        pixel_values=batch["pixel_values"],
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=mask,
        use_cache=False,
    ).logits  # (B, T, V), position t predicts labels[:, t]
    return token_loss(
        logits,
        labels,
        label_smoothing=label_smoothing,
        z_loss_coef=z_loss_coef,
        reduction=reduction,
    )


def caption(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    images_uint8: Tensor,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    *,
    batch_size: int = 64,
) -> list[str]:
    """One caption per image of ``images_uint8`` (N, C, H, W): greedy search (beam search
    with ``num_beams`` > 1) from the start token until eos or ``max_new_tokens``."""
    ids = caption_ids(model, images_uint8, max_new_tokens, num_beams, batch_size=batch_size)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def caption_ids(
    model: nn.Module,
    images_uint8: Tensor,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    *,
    batch_size: int = 64,
) -> list[list[int]]:
    """Each image's caption as the token ids generated after the start token, up to and
    including eos (a caption without eos was cut at ``max_new_tokens``, which the decoder's
    positions bound: start token + new tokens)."""
    if max_new_tokens < 1 or num_beams < 1:
        raise GenloopError("max_new_tokens and num_beams must be at least 1")
    cfg = hf_config(model)
    max_new_tokens = min(max_new_tokens, int(cfg.decoder.max_position_embeddings) - 1)
    eos = int(cfg.eos_token_id)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for i in range(0, images_uint8.shape[0], batch_size):
            pixels = pixel_values(model, images_uint8[i : i + batch_size])
            # the start token's mask; generate extends it (a finished caption's padding is
            # never read back: its tokens are cut at eos)
            start_mask = torch.ones((pixels.shape[0], 1), dtype=torch.long, device=pixels.device)
            ids = model.generate(  # type: ignore[operator]
                pixel_values=pixels,
                decoder_attention_mask=start_mask,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                decoder_start_token_id=cfg.decoder_start_token_id,
                bos_token_id=cfg.decoder_start_token_id,
                eos_token_id=eos,
                pad_token_id=cfg.pad_token_id,
            )  # (B, 1 + T): the start token, then the caption and padding after its eos
            for row in ids[:, 1:].tolist():
                out.append(row[: row.index(eos) + 1] if eos in row else row)
    finally:
        model.train(was_training)
    return out


def load_captioner(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[VisionEncoderDecoderModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a captioning artifact (the family's sampler)."""
    from genloop.data.tokenizer import load_hf_tokenizer

    model = FAMILY.load(path, device=device)
    return model, load_hf_tokenizer(Path(path))  # type: ignore[return-value]


# ------------------------------------------------------------------------------ family


class Captioning:
    """The ``captioning`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "captioning"

    def build(self, config: Mapping[str, Any]) -> VisionEncoderDecoderModel:
        """A freshly initialised ViT + GPT-2 ``VisionEncoderDecoderModel``; seed torch first."""
        from transformers import VisionEncoderDecoderModel

        spec = spec_from_config(config)
        return VisionEncoderDecoderModel(config=spec.tohf_config())

    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, Tensor],
        *,
        label_smoothing: float = 0.0,
        z_loss_coef: float = 0.0,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> Tensor:
        return caption_loss(
            model,
            batch,
            label_smoothing=label_smoothing,
            z_loss_coef=z_loss_coef,
            reduction=reduction,
        )

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the Hugging Face directory (see the module docstring) into a new or empty
        ``out_dir``."""
        from transformers import VisionEncoderDecoderModel
        from transformers.utils import logging as hf_logging

        if not isinstance(model, VisionEncoderDecoderModel):
            raise GenloopError(
                f"expected a VisionEncoderDecoderModel, got {type(model).__name__}; unwrap "
                "torch.compile (._orig_mod) or DDP (.module) wrappers before saving"
            )
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConflictError(f"{out} already exists and is not an empty directory")
        sources = _tokenizer_sources(Path(tokenizer_dir)) if tokenizer_dir is not None else []
        try:
            meta = json.dumps({"family": self.name, **(extra or {})}, indent=2, sort_keys=True)
        except TypeError as exc:
            raise GenloopError(f"extra metadata must be JSON-serializable: {exc}") from None
        out.mkdir(parents=True, exist_ok=True)
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        model.save_pretrained(out)  # safetensors only in transformers ≥ 5
        enc = hf_config(model).encoder
        side, channels = int(enc.image_size), int(enc.num_channels)
        # what transformers' AutoImageProcessor reads: uint8 → [-1, 1] at the model's size,
        # as pixel_values() does
        processor = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": side, "width": side},
            "resample": 2,  # bilinear
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5] * channels,
            "image_std": [0.5] * channels,
        }
        (out / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
        for source in sources:
            shutil.copyfile(source, out / source.name)
        (out / GENLOOP_JSON).write_text(meta + "\n")
        return out

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,  # weights are read from safetensors only
    ) -> VisionEncoderDecoderModel:
        """The model in ``path`` (verified against its manifest), in eval mode, float32."""
        from transformers import VisionEncoderDecoderModel
        from transformers.utils import logging as hf_logging

        from genloop.security.safe_load import check_safetensors

        check_dtype(dtype)
        path = Path(path)
        verify_dir(path)
        config_file = path / "config.json"
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except FileNotFoundError:
            raise NotFoundError(f"{path} has no config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise GenloopError(f"{config_file} is not a JSON config object ({exc})") from None
        if model_type != MODEL_TYPE:
            raise GenloopError(f"{path} holds a {model_type!r} model, not a {MODEL_TYPE} one")
        weights = path / SAFETENSORS
        if not weights.is_file():
            raise NotFoundError(f"{path} has no {SAFETENSORS} (weights load from safetensors only)")
        check_safetensors([weights])
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        model = VisionEncoderDecoderModel.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
        loaded: VisionEncoderDecoderModel = model.to(device).eval()  # type: ignore[arg-type]
        return loaded

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


FAMILY: Family = Captioning()


def hf_config(model: nn.Module) -> Any:
    """The transformers config of a VisionEncoderDecoderModel (untyped: its sub-configs are
    read by attribute)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != MODEL_TYPE:
        raise GenloopError(f"{type(model).__name__} is not a VisionEncoderDecoderModel")
    return config


def _tokenizer_sources(tokenizer_dir: Path) -> list[Path]:
    if not tokenizer_dir.is_dir():
        raise NotFoundError(f"tokenizer directory {tokenizer_dir} does not exist")
    found = []
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if source.is_symlink():
            raise GenloopError(f"{source} is a symbolic link; copy the file itself")
        if source.is_file():
            found.append(source)
    if not found:
        raise GenloopError(f"{tokenizer_dir} holds no tokenizer files")
    return found


def _check_int(key: str, value: Any, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ConfigError(f"{key} must be {kind} (got {value!r})")
