"""The ``captioning`` family for the training loop: a ViT + GPT-2 captioner sized by a
captioned image dataset, and the teacher-forced caption objective.

The data is a captioned image dataset version (``genloop.data.images.caption_split``):
uint8 images N×C×H×W with one caption each, and the ``tokenizer/`` that prepare trained on
the captions, which gives the vocabulary and the special tokens. A trained model is
sampled by ``genloop.models.captioning.load_captioner`` + ``caption``.

A training batch is a dict of tensors on the device::

    pixel_values  (B, C, H, W) float in [-1, 1], after train.augment (crop, jitter; never
                  a flip, which would swap the left and right the captions name)
    labels        (B, T) the caption's token ids and eos, -100 after it (T: the batch's
                  longest caption)

Batches depend only on their position (seed, micro-step, rank), as for the image families,
so a resumed run sees exactly the batches the uninterrupted one saw. The count the loop
sums as "tokens" is the number of caption tokens trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError
from genloop.train.families import BuiltModel, TrainingData, base_model_dir, wrong_family
from genloop.train.images import seeded_batches, val_windows

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from genloop.config import ModelConfig, TrainConfig
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

Batch = dict[str, "Tensor"]
DEFAULT_CONTEXT = 64  # decoder positions, unless model.context_length or a longer caption


def require_captions(data: TrainingData, split: str = "train") -> tuple[Tensor, list[str]]:
    """The images and captions of ``split``, or a clear error naming what is missing."""
    from genloop.data.images import caption_split

    found = caption_split(data.dir, split)
    if found is None or found[0].shape[0] == 0:
        raise GenloopError(
            f"{data.ref} has no captioned images in its {split} split: captioning trains on "
            "an images dataset whose records carry text (an image folder with "
            "metadata.jsonl, a Hugging Face dataset with a text column, or the shapes builtin)"
        )
    return found


def special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """Vocabulary size and bos/eos/pad ids of a tokenizer directory (bos and pad fall back
    to eos, as genloop's BPE has bos = eos)."""
    from genloop.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(tokenizer_dir)
    if tok.eos_token_id is None:
        raise GenloopError(f"the tokenizer at {tokenizer_dir} has no eos token to end captions")
    eos = int(tok.eos_token_id)
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return {"vocab_size": len(tok), "bos_token_id": int(bos), "eos_token_id": eos,
            "pad_token_id": int(pad)}  # fmt: skip


def encode_captions(tokenizer_dir: Path, captions: Sequence[str], max_len: int) -> Tensor:
    """Labels (N, T) int64: each caption's token ids and eos, -100 after it; T is the
    longest (at most ``max_len``; longer captions are cut, with a warning)."""
    import torch

    from genloop.data.tokenizer import eos_token_id, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    eos = eos_token_id(tokenizer_dir, tok)
    rows = [[*enc.ids, eos] for enc in tok.encode_batch(list(captions), add_special_tokens=False)]
    cut = sum(len(r) > max_len for r in rows)
    if cut:
        log.warning(
            "%d of %d captions are longer than the decoder's %d positions and were cut "
            "(raise model.context_length)",
            cut,
            len(rows),
            max_len,
        )
    width = min(max((len(r) for r in rows), default=1), max_len)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:width]
        labels[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return labels


def longest_caption(tokenizer_dir: Path, captions: Sequence[str]) -> int:
    """Tokens of the longest caption, eos included."""
    from genloop.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    encoded = tok.encode_batch(list(captions), add_special_tokens=False)
    return max((len(e.ids) + 1 for e in encoded), default=1)


# ------------------------------------------------------------------------------ model


def build_model(
    ws: Workspace, m: ModelConfig, data: TrainingData, device: torch.device
) -> BuiltModel:
    """The captioner to train, its config dict and the ref it continues from (if any).

    Image side and channels come from the dataset (``model.image_size``/``channels``, when
    set, must agree); the vocabulary and special tokens from its tokenizer; the decoder's
    positions from ``model.context_length``, else the longest caption (at least 64).
    """
    from genloop.models.captioning import FAMILY, hf_config, spec_from_config

    if data.image_normalize not in (None, "minus_one_one"):
        raise ConfigError(
            "the captioning family reads pixels in [-1, 1]: leave data.images.normalize at "
            "minus_one_one"
        )
    images, captions = require_captions(data)
    if data.tokenizer_dir is None:
        raise GenloopError(
            f"{data.ref} has no tokenizer/: prepare the captioned images with a tokenizer "
            "section, so the captions have a vocabulary"
        )
    _, channels, height, width = images.shape
    if height != width:
        raise GenloopError(f"captioning needs square images; the dataset's are {width}×{height}")
    if m.image_size is not None and m.image_size != height:
        raise ConfigError(
            f"model.image_size is {m.image_size} but the dataset's images are {height}×{height}: "
            f"prepare the data with data.images.size: {m.image_size}, or leave it unset"
        )
    if m.channels is not None and m.channels != channels:
        raise ConfigError(
            f"model.channels is {m.channels} but the dataset's images have {channels}: prepare "
            f"the data with data.images.channels: {m.channels}, or leave it unset"
        )
    ids = special_ids(data.tokenizer_dir)
    if m.base_model is not None:  # continue training a captioning model version
        base_dir, parent = base_model_dir(ws, m.base_model)
        model = FAMILY.load(base_dir, device=device)
        config = hf_config(model)
        vocab = int(config.decoder.vocab_size)
        if vocab != ids["vocab_size"]:
            raise ConfigError(
                f"model.base_model {m.base_model} has a vocabulary of {vocab} tokens but "
                f"{data.ref}'s tokenizer has {ids['vocab_size']}: train on data tokenized "
                "with the model's own tokenizer"
            )
        model.train()
        return BuiltModel(model, config.to_dict(), parent)

    context = m.context_length or max(
        DEFAULT_CONTEXT, longest_caption(data.tokenizer_dir, captions)
    )
    spec = spec_from_config(
        {
            "preset": m.preset,
            "image_size": int(height),
            "channels": int(channels),
            **ids,
            "n_layer": m.n_layer,
            "n_embd": m.n_embd,
            "n_head": m.n_head,
            "intermediate_size": m.intermediate_size,
            "dropout": m.dropout,
            "context_length": context,
        }
    )
    model = FAMILY.build(spec.to_dict())
    return BuiltModel(model.to(device), spec.to_dict(), None)


# -------------------------------------------------------------------------- objective


@dataclass
class CaptionObjective:
    """Batches of normalized images and their caption labels; teacher-forced CE."""

    images: Tensor  # uint8 (N, C, H, W), the training split
    labels: Tensor  # int64 (N, T), -100 padded
    val_images: Tensor
    val_labels: Tensor
    batch_size: int
    seed: int
    device: torch.device
    crop_padding: int = 0
    jitter: float = 0.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    name: str = "captioning"

    def _batch(self, images: Tensor, labels: Tensor, g: torch.Generator, train: bool) -> Batch:
        from genloop.data.images import augment, normalize

        x = normalize(images)
        if train and (self.crop_padding or self.jitter):
            x = augment(x, g, flip=False, crop_pad=self.crop_padding, jitter=self.jitter)
        width = int((labels >= 0).sum(1).max()) if labels.numel() else 1  # the batch's longest
        return {"pixel_values": x.to(self.device), "labels": labels[:, :width].to(self.device)}

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
        from genloop.models.captioning import caption_loss

        loss = caption_loss(
            model, batch, label_smoothing=self.label_smoothing, z_loss_coef=self.z_loss
        )
        return loss, int((batch["labels"] >= 0).sum())

    def after_step(self, model: nn.Module) -> None:
        """Nothing to do after an optimizer step (no EMA)."""


def make_objective(
    t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> CaptionObjective:
    """The ``captioning`` objective on the dataset's captioned train and val splits."""
    import torch

    from genloop.data.images import caption_split
    from genloop.models.captioning import hf_config

    if t.objective != "captioning":
        raise wrong_family(t.objective)
    if t.augment.flip:
        raise ConfigError(
            "train.augment.flip mirrors images, which swaps the left and right their captions "
            "name: turn it off for captioning"
        )
    images, captions = require_captions(data)
    assert data.tokenizer_dir is not None  # build_model made sure
    positions = int(hf_config(model).decoder.max_position_embeddings)
    labels = encode_captions(data.tokenizer_dir, captions, positions)
    val = caption_split(data.dir, "val")
    if val is None or val[0].shape[0] == 0:
        val_images, val_labels = images[:0], labels[:0]
    else:
        val_images, val_labels = val[0], encode_captions(data.tokenizer_dir, val[1], positions)
    return CaptionObjective(
        images=images,
        labels=labels,
        val_images=val_images,
        val_labels=val_labels,
        batch_size=t.batch_size,
        seed=t.seed,
        device=torch.device(device),
        crop_padding=t.augment.crop_padding,
        jitter=t.augment.jitter,
        label_smoothing=t.label_smoothing,
        z_loss=t.z_loss,
    )


@dataclass(frozen=True)
class CaptioningBuilder:
    """The captioning family as the loop builds it (see ``families.Builder``)."""

    family: str = "captioning"
    sampler: str = "genloop.models.captioning:load_captioner"

    def build_model(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        *,
        trust_pickle: bool = False,  # captioning models are read from safetensors only
    ) -> BuiltModel:
        return build_model(ws, m, data, device)

    def make_objective(
        self, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
    ) -> CaptionObjective:
        return make_objective(t, data, model, device)


BUILDERS: dict[str, Any] = {"captioning": CaptioningBuilder()}
