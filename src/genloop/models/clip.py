"""The CLIP family: a dual encoder trained with the contrastive loss (Radford et al., 2021),
as transformers ``CLIPModel``.

    image  x (B, C, H, W) in [-1, 1] → ViT (patches, [CLS]) → visual_projection → u (B, D)
    text   ids (B, T) ending in eos → causal transformer, pooled at eos → text_projection → v
    logits[i, j] = exp(t) · cos(v_i, u_j)                      (t: the learned logit_scale)
    L = ½ · (CE(logits, targets) + CE(logitsᵀ, targetsᵀ))      (text→image and image→text)

The targets are the identity for distinct captions. A small captioned corpus repeats
captions ("a large red circle on the left"), and two images with one caption in a batch are
both right for it: :func:`contrastive_loss` spreads the target over every image with the
same caption (``groups``) instead of calling one of them a negative.

Text encoding. CLIP pools the text tower at the end-of-text token, the first position
whose id is ``config.text_config.eos_token_id`` (transformers' rule for every eos id but 2,
see ``CLIPTextTransformer``), so every encoded text must end with it. The genloop
byte-level BPE appends nothing, so the tokenizer saved with a CLIP model gets a
post-processor that appends eos (and ``model_max_length`` = the text context): then
``tok(texts, padding=True, truncation=True)`` is the encoding everywhere, diffusers'
Stable Diffusion pipeline included (it calls the tokenizer with ``padding="max_length"``).
Padding goes to the right, after eos, where the causal text tower cannot see it.

Config dict keys (``build``): ``vocab_size``, ``eos_token_id``, ``pad_token_id``,
``image_size``, ``channels``, ``patch_size``, ``vision_hidden``, ``vision_layers``,
``text_hidden``, ``text_layers``, ``heads``, ``max_text_length``, ``projection_dim``,
``logit_scale_init``. Artifact: the Hugging Face layout (``config.json``,
``model.safetensors``, tokenizer files, ``preprocessor_config.json``, ``genloop.json``), so
``CLIPModel.from_pretrained(dir)`` loads it unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.models.family import Family, count_parameters

if TYPE_CHECKING:
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

PREPROCESSOR_FILE = "preprocessor_config.json"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature at 100
DEFAULTS: dict[str, Any] = {
    "channels": 3,
    "patch_size": 4,
    "vision_hidden": 128,
    "vision_layers": 3,
    "text_hidden": 128,
    "text_layers": 3,
    "heads": 4,
    "max_text_length": 32,
    "projection_dim": 128,
    "logit_scale_init": math.log(1 / 0.07),  # CLIP's initial temperature
}
REQUIRED = ("vocab_size", "eos_token_id", "pad_token_id", "image_size")
BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "groups")
TEXT_BATCH = 256  # texts or images per forward pass when computing features


def clip_config(config: Mapping[str, Any]) -> CLIPConfig:
    """The transformers ``CLIPConfig`` of a plain config dict (see the module docstring)."""
    from transformers import CLIPConfig

    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise GenloopError(f"clip model config is missing {', '.join(missing)}")
    unknown = sorted(set(config) - set(REQUIRED) - set(DEFAULTS))
    if unknown:
        raise GenloopError(
            f"unknown clip config keys {', '.join(unknown)} "
            f"(known: {', '.join((*REQUIRED, *DEFAULTS))})"
        )
    c = {**DEFAULTS, **config}
    image_size, patch = int(c["image_size"]), int(c["patch_size"])
    if image_size < patch or image_size % patch:
        raise GenloopError(f"image_size {image_size} is not a multiple of patch_size {patch}")
    for tower in ("vision_hidden", "text_hidden"):
        if int(c[tower]) % int(c["heads"]):
            raise GenloopError(f"{tower} ({c[tower]}) must be divisible by heads ({c['heads']})")
    if int(c["eos_token_id"]) == 2:
        # transformers pools at argmax(input_ids) for eos id 2 (the original checkpoints'
        # quirk), which is not the eos position for any other vocabulary
        raise GenloopError(
            "the tokenizer's end token has id 2, which CLIPTextModel treats as 'pool at the "
            "highest id'; use a tokenizer whose end token has another id"
        )
    text = {
        "vocab_size": int(c["vocab_size"]),
        "hidden_size": int(c["text_hidden"]),
        "intermediate_size": 4 * int(c["text_hidden"]),
        "num_hidden_layers": int(c["text_layers"]),
        "num_attention_heads": int(c["heads"]),
        "max_position_embeddings": int(c["max_text_length"]),
        "eos_token_id": int(c["eos_token_id"]),
        "bos_token_id": int(c["eos_token_id"]),
        "pad_token_id": int(c["pad_token_id"]),
        "projection_dim": int(c["projection_dim"]),
    }
    vision = {
        "hidden_size": int(c["vision_hidden"]),
        "intermediate_size": 4 * int(c["vision_hidden"]),
        "num_hidden_layers": int(c["vision_layers"]),
        "num_attention_heads": int(c["heads"]),
        "image_size": image_size,
        "patch_size": patch,
        "num_channels": int(c["channels"]),
        "projection_dim": int(c["projection_dim"]),
    }
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=int(c["projection_dim"]),
        logit_scale_init_value=float(c["logit_scale_init"]),
    )


def contrastive_loss(logits_per_text: Tensor, groups: Tensor | None = None) -> Tensor:
    """CLIP's symmetric cross-entropy over a (B, B) text × image logit matrix.

    ``groups`` (B,) gives each pair's caption id: image j is a right answer for text i when
    ``groups[i] == groups[j]``, and the target mass is shared among the right answers.
    Without ``groups`` the targets are the identity (transformers' ``clip_loss``).
    """
    logits = logits_per_text.float()
    n = logits.shape[0]
    if groups is None:
        targets = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    same = (groups[:, None] == groups[None, :]).float()  # (B, B), symmetric
    soft = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, soft) + F.cross_entropy(logits.t(), soft)) / 2


def clip_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """(B, B) text × image logits of a batch (``input_ids``, ``attention_mask``,
    ``pixel_values``): exp(logit_scale) · cosine similarity."""
    unknown = [k for k in batch if k not in BATCH_KEYS]
    missing = [k for k in ("input_ids", "pixel_values") if k not in batch]
    if unknown or missing:
        raise GenloopError(
            f"a clip batch needs input_ids and pixel_values (got {', '.join(batch)}; "
            f"valid: {', '.join(BATCH_KEYS)})"
        )
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        pixel_values=batch["pixel_values"],
    )
    logits: Tensor = out.logits_per_text
    return logits


# ------------------------------------------------------------------- tokenizer and images


def encodes_eos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether ``tok("a")`` already ends with the tokenizer's eos (CLIP's own tokenizer
    does; a genloop byte-level BPE does not)."""
    ids = tok("a")["input_ids"]
    return bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id


def write_clip_tokenizer(tokenizer_dir: Path, out_dir: Path, max_length: int) -> None:
    """Save the tokenizer of ``tokenizer_dir`` into ``out_dir`` ready for CLIP: eos appended
    to every text (a template post-processor, when it does not already), right padding,
    ``model_max_length`` = the text context."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if tok.eos_token is None or tok.pad_token is None:
        raise GenloopError(f"the tokenizer in {tokenizer_dir} needs an eos and a pad token")
    if not encodes_eos(tok):
        backend = tok.backend_tokenizer
        eos, eos_id = tok.eos_token, tok.eos_token_id
        steps = [backend.post_processor] if backend.post_processor is not None else []
        template = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)]
        )
        backend.post_processor = processors.Sequence([*steps, template])
    tok.model_max_length = max_length
    tok.padding_side = "right"
    tok.save_pretrained(str(out_dir))
    if not encodes_eos(AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)):
        raise GenloopError(f"the tokenizer saved in {out_dir} does not append its eos token")


def encode_texts(
    tok: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, device: Any = "cpu"
) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T ≤ max_length), each text ending in eos
    (a longer text is cut before its eos), padded on the right."""
    if not encodes_eos(tok):
        raise GenloopError(
            "this tokenizer does not end texts with its eos token, where CLIP pools; save the "
            "model with the clip family (it writes a tokenizer that does)"
        )
    enc = tok(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": enc["attention_mask"].to(device),
    }


def pixel_stats(model: Any) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, std) the vision tower expects of pixels in [0, 1], each (C,).

    genloop's models see pixels in [-1, 1] (mean = std = 0.5); an imported checkpoint keeps
    what its ``preprocessor_config.json`` said (``load_clip`` sets them on the model).
    """
    channels = int(model.config.vision_config.num_channels)
    mean = getattr(model, "genloop_image_mean", None) or [0.5] * channels
    std = getattr(model, "genloop_image_std", None) or [0.5] * channels
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def pixel_values(model: Any, images_uint8: Tensor) -> Tensor:
    """uint8 images (B, C, H, W) → the vision tower's input (B, C, S, S) on its device:
    resized to its ``image_size`` when they differ, normalised by :func:`pixel_stats`."""
    vision = model.config.vision_config
    device = next(model.parameters()).device
    mean, std = pixel_stats(model)
    return to_pixels(
        images_uint8.to(device), int(vision.image_size), int(vision.num_channels), mean, std
    )


def to_pixels(images_uint8: Tensor, size: int, channels: int, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, C, H, W) → float (B, C, size, size): x/255, bicubic resize (only when the
    size differs), then (x - mean) / std per channel."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise GenloopError(
            f"expected uint8 images (B, C, H, W), got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    if images_uint8.shape[1] != channels:
        raise GenloopError(
            f"the model takes {channels}-channel images, these have {images_uint8.shape[1]}"
        )
    x = images_uint8.float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    mean, std = mean.to(x.device)[:, None, None], std.to(x.device)[:, None, None]
    return (x - mean) / std


def text_context(model: Any) -> int:
    """The text tower's context in tokens."""
    return int(model.config.text_config.max_position_embeddings)


def image_size(model: Any) -> int:
    """The side of the images the vision tower takes."""
    return int(model.config.vision_config.image_size)


@torch.no_grad()
def image_features(model: Any, images_uint8: Tensor) -> Tensor:
    """L2-normalised image embeddings (B, D) of uint8 images (B, C, H, W)."""
    out = []
    for i in range(0, images_uint8.shape[0], TEXT_BATCH):
        pixels = pixel_values(model, images_uint8[i : i + TEXT_BATCH])
        feats = model.get_image_features(pixel_values=pixels).pooler_output
        out.append(F.normalize(feats.float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, int(model.config.projection_dim))


@torch.no_grad()
def text_features(model: Any, tok: PreTrainedTokenizerBase, texts: Sequence[str]) -> Tensor:
    """L2-normalised text embeddings (B, D), each text encoded by :func:`encode_texts`."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), TEXT_BATCH):
        enc = encode_texts(tok, texts[i : i + TEXT_BATCH], text_context(model), device)
        feats = model.get_text_features(**enc).pooler_output
        out.append(F.normalize(feats.float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, int(model.config.projection_dim))


# ------------------------------------------------------------------------- save and load


def _write_preprocessor(model: Any, out: Path) -> None:
    """``preprocessor_config.json`` for transformers' ``CLIPImageProcessor``: the size and
    the pixel statistics this model was trained with."""
    vision = model.config.vision_config
    size = int(vision.image_size)
    mean, std = pixel_stats(model)
    spec = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean.tolist(),
        "image_std": std.tolist(),
        "do_convert_rgb": int(vision.num_channels) == 3,
        "resample": 3,
    }
    (out / PREPROCESSOR_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def _read_preprocessor(path: Path, model: Any) -> None:
    """Set the pixel statistics of an imported checkpoint's ``preprocessor_config.json``."""
    file = path / PREPROCESSOR_FILE
    if not file.is_file():
        return
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenloopError(f"{file} is not valid JSON: {exc}") from None
    channels = int(model.config.vision_config.num_channels)
    for key in ("image_mean", "image_std"):
        value = spec.get(key) if isinstance(spec, dict) else None
        if value is None:
            continue
        if not (
            isinstance(value, list)
            and len(value) == channels
            and all(isinstance(v, int | float) for v in value)
        ):
            raise GenloopError(f"{file}: {key} must be a list of {channels} numbers")
        if key == "image_std" and min(value) <= 0:
            raise GenloopError(f"{file}: image_std must be positive")
        setattr(model, f"genloop_{key}", [float(v) for v in value])


def load_clip(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """The CLIP model (eval mode) and its tokenizer in ``path``, files verified first."""
    from genloop.data.tokenizer import load_hf_tokenizer

    path = Path(path)
    model = FAMILY.load(path, device=device)
    tok = load_hf_tokenizer(path)
    return model, tok  # type: ignore[return-value]


def text_encoder_from_clip(
    clip_dir: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[CLIPTextModel, PreTrainedTokenizerFast]:
    """Stable Diffusion's text encoder: ``CLIPTextModel(config.text_config)`` holding the
    CLIP text tower's weights (``text_model.*``; the projection is not part of it), and the
    CLIP model's tokenizer, which ends texts with eos and pads to the text context."""
    from transformers import CLIPTextModel

    model, tok = load_clip(clip_dir, device="cpu")
    encoder = CLIPTextModel(model.config.text_config)  # type: ignore[arg-type]
    encoder.load_state_dict(model.text_model.state_dict(), strict=True)
    encoder.to(device)  # type: ignore[arg-type]
    return encoder.eval(), tok  # type: ignore[return-value,no-untyped-call]


class Clip:
    """The ``clip`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "clip"

    def build(self, config: Mapping[str, Any]) -> CLIPModel:
        """A freshly initialised ``CLIPModel`` (seed torch first for a reproducible one)."""
        from transformers import CLIPModel

        model = CLIPModel(clip_config(config))
        return model

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return contrastive_loss(clip_logits(model, batch), batch.get("groups"))

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """The Hugging Face layout; the tokenizer is rewritten to end texts with eos."""
        from genloop.models.pretrained import save_hf_dir

        if tokenizer_dir is None:
            raise GenloopError("a clip model is saved with its tokenizer (tokenizer_dir)")
        out = save_hf_dir(model, out_dir, family="clip", extra=extra)
        write_clip_tokenizer(Path(tokenizer_dir), out, text_context(model))
        _write_preprocessor(model, out)
        return out

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> CLIPModel:
        from genloop.models.image_io import verify_dir
        from genloop.models.pretrained import load_pretrained

        path = Path(path)
        verify_dir(path)
        model = load_pretrained(
            path, family="clip", device=device, dtype=dtype, trust_pickle=trust_pickle
        )
        _read_preprocessor(path, model)
        return model  # type: ignore[return-value]

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


FAMILY: Family = Clip()
