"""The ``clip`` family for the training loop: a dual encoder sized by a captioned image
dataset, trained with the contrastive objective.

A captioned image dataset version holds ``images/<split>/images.safetensors`` with
``captions.json`` beside it (``genloop.data.images.caption_split``) and the BPE tokenizer
trained on its captions (``tokenizer/``). The model takes its image side and channels from
the images, its vocabulary and special ids from the tokenizer, and its sizes from
``model.clip``. Captions are tokenized once, each ending in eos (see ``models/clip.py``).

A training batch is a dict of tensors on the device::

    pixel_values    (B, C, S, S) float, the images normalised as the model expects
    input_ids       (B, T) long, T the longest caption of the batch (eos included)
    attention_mask  (B, T) 0/1
    groups          (B,) long caption ids: equal captions are all right answers

Batches are drawn by ``objectives.batch_indices`` (resumable by micro-step); validation
batches are the first ones of the val split, the same every evaluation.

Hard negatives (``train.hard_negatives`` = h). In a random batch of a compositional corpus
almost every caption is told apart from the others by its colours, sizes and positions
alone, so the loss falls near zero while the image tower still cannot tell a circle from a
square. With h > 0, the last ⌊h·B⌋ pairs of each batch are replaced by *neighbours* of the
first ones: pairs whose caption differs from an anchor's in exactly one token ("a small
red circle …" / "a small red square …"), so the batch can only be solved by seeing every
attribute. Neighbours are found on the token ids, with nothing specific to one corpus; an
anchor without one keeps its random partner. The draw is seeded by (seed, micro-step), so
a resumed run sees the same batches. After each
optimizer step the logit scale is clipped at ln 100, as CLIP does. The count the loop sums
as "tokens" is the number of image-caption pairs.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError
from genloop.train.families import BuiltModel, TrainingData, base_model_dir, wrong_family

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from genloop.config import ModelConfig, TrainConfig
    from genloop.workspace.workspace import Workspace

Batch = dict[str, "Tensor"]
OBJECTIVE = "contrastive"


def captioned(data: TrainingData, split: str = "train") -> tuple[Tensor, list[str]]:
    """The (uint8 images, captions) of a split, or a clear error when there are none."""
    from genloop.data.images import caption_split

    found = caption_split(data.dir, split)
    if found is None:
        raise GenloopError(
            f"dataset {data.ref} has no captioned images in its {split} split: clip trains on "
            "an images dataset whose records carry text (captions)"
        )
    if found[0].shape[0] == 0:
        raise GenloopError(f"dataset {data.ref} has no {split} images")
    return found


def _tokenizer_dir(data: TrainingData) -> Path:
    if data.tokenizer_dir is None:
        raise GenloopError(
            f"dataset {data.ref} has no tokenizer/: prepare the captioned images with a "
            "tokenizer section so clip can encode the captions"
        )
    return data.tokenizer_dir


# ------------------------------------------------------------------------------ model


def build_model(
    ws: Workspace, m: ModelConfig, data: TrainingData, device: torch.device
) -> BuiltModel:
    """The CLIP model to train: sized by the dataset and ``model.clip``, or ``base_model``."""
    from genloop.models.clip import FAMILY as CLIP
    from genloop.models.clip import clip_config

    images, _ = captioned(data)
    _, channels, height, width = images.shape
    if height != width:
        raise GenloopError(f"clip needs square images; the dataset's are {width}×{height}")
    if m.image_size is not None and m.image_size != height:
        raise ConfigError(
            f"model.image_size is {m.image_size} but the dataset's images are {height}×{height}: "
            f"prepare the data with data.images.size: {m.image_size}, or leave it unset"
        )
    if m.channels is not None and m.channels != channels:
        raise ConfigError(
            f"model.channels is {m.channels} but the dataset's images have {channels} channels"
        )
    tokenizer_dir = _tokenizer_dir(data)
    if m.base_model is not None:  # continue training a CLIP version or a local checkpoint
        base_dir, parent = base_model_dir(ws, m.base_model)
        model = CLIP.load(base_dir, device=device)
        _check_same_tokenizer(base_dir, tokenizer_dir)
        model.train()
        return BuiltModel(model, {"base_model": m.base_model}, parent)

    from genloop.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(tokenizer_dir)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise GenloopError(f"the tokenizer of {data.ref} needs an eos and a pad token")
    config: dict[str, Any] = {
        "vocab_size": len(tok),
        "eos_token_id": int(tok.eos_token_id),
        "pad_token_id": int(tok.pad_token_id),
        "image_size": int(height),
        "channels": int(channels),
        **m.clip.model_dump(),
    }
    try:
        clip_config(config)
    except GenloopError as exc:  # a size problem is the config's: say which section
        raise ConfigError(f"model.clip: {exc}") from None
    model = CLIP.build(config)
    return BuiltModel(model.to(device), config, None)


def _check_same_tokenizer(base_dir: Path, tokenizer_dir: Path) -> None:
    """A base model keeps its vocabulary: the dataset's captions must be tokenized by it."""
    from genloop.data.tokenizer import load_tokenizer

    if load_tokenizer(base_dir).get_vocab() != load_tokenizer(tokenizer_dir).get_vocab():
        raise ConfigError(
            f"model.base_model's tokenizer ({base_dir}) differs from the dataset's; prepare "
            "the captioned data with the model's tokenizer (tokenizer.path)"
        )


# -------------------------------------------------------------------------- objective


@dataclass
class ContrastiveObjective:
    """Image-caption batches and CLIP's symmetric contrastive loss."""

    images: Tensor  # uint8 (N, C, H, W), the training split
    input_ids: Tensor  # (N, T) long, right-padded, eos-terminated
    attention_mask: Tensor  # (N, T)
    groups: Tensor  # (N,) caption ids
    val: tuple[Tensor, Tensor, Tensor, Tensor]  # the same four of the val split
    image_size: int
    mean: Tensor  # (C,) pixel statistics of the model
    std: Tensor
    batch_size: int
    seed: int
    device: torch.device
    hard_negatives: float = 0.0  # share of each batch given to anchors' neighbours
    neighbours: Neighbours | None = None  # built when hard_negatives > 0
    name: str = OBJECTIVE

    def _batch(self, images: Tensor, ids: Tensor, mask: Tensor, groups: Tensor) -> Batch:
        from genloop.models.clip import to_pixels

        length = max(int(mask.sum(dim=1).max()), 1)  # trim the batch's common padding
        pixels = to_pixels(images, self.image_size, images.shape[1], self.mean, self.std)
        batch = {
            "pixel_values": pixels,
            "input_ids": ids[:, :length],
            "attention_mask": mask[:, :length],
            "groups": groups,
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        import torch

        from genloop.train.objectives import batch_indices

        order = batch_indices(
            len(self.images), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for step, idx in enumerate(order, start):
            if self.neighbours is not None and self.hard_negatives > 0:
                idx = self.neighbours.harden(
                    idx, self.hard_negatives, (self.seed, step, rank, world_size)
                )
            i = torch.tensor(idx)
            yield self._batch(
                self.images[i], self.input_ids[i], self.attention_mask[i], self.groups[i]
            )

    def val_batches(self, n: int) -> list[Batch]:
        images, ids, mask, groups = self.val
        count, b = min(len(images), n * self.batch_size), self.batch_size
        return [
            self._batch(images[i : i + b], ids[i : i + b], mask[i : i + b], groups[i : i + b])
            for i in range(0, count, b)
            if min(b, count - i) > 1  # a lone pair has no negatives
        ]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        from genloop.models.clip import FAMILY as CLIP

        return CLIP.loss(model, batch), int(batch["input_ids"].shape[0])

    def after_step(self, model: nn.Module) -> None:
        """CLIP clips the learned temperature: exp(logit_scale) ≤ 100."""
        import torch

        scale = getattr(model, "logit_scale", None)
        if isinstance(scale, torch.nn.Parameter):
            with torch.no_grad():
                scale.clamp_(0.0, math.log(100.0))


@dataclass(frozen=True)
class Neighbours:
    """Which captions differ in exactly one token, over caption groups (distinct captions).

    ``members[g]``: the training pairs whose caption is group g; ``near[g]``: the groups
    one token away from g (same length, one position different).
    """

    groups: list[int]  # (N,) the group of each training pair
    members: dict[int, list[int]]
    near: dict[int, list[int]]

    @classmethod
    def of(cls, input_ids: Tensor, attention_mask: Tensor, groups: Tensor) -> Neighbours:
        """Index the captions (``input_ids``/``attention_mask`` (N, T), ``groups`` (N,)):
        each distinct caption goes into one bucket per position, keyed by the caption with
        that position blanked; captions sharing a bucket are neighbours."""
        from collections import defaultdict

        group_of = groups.tolist()
        members: dict[int, list[int]] = defaultdict(list)
        tokens: dict[int, tuple[int, ...]] = {}
        for k, (g, row, n) in enumerate(
            zip(group_of, input_ids.tolist(), attention_mask.sum(dim=1).tolist(), strict=True)
        ):
            members[g].append(k)
            tokens.setdefault(g, tuple(row[:n]))
        buckets: dict[tuple[int, tuple[int, ...], tuple[int, ...]], list[int]] = defaultdict(list)
        for g, row in tokens.items():
            for j in range(len(row)):
                buckets[(len(row), row[:j], row[j + 1 :])].append(g)
        near: dict[int, list[int]] = defaultdict(list)
        for bucket in buckets.values():
            for g in bucket:
                near[g].extend(h for h in bucket if h != g)
        return cls(group_of, dict(members), {g: sorted(set(h)) for g, h in near.items() if h})

    def harden(self, idx: list[int], share: float, seed: tuple[int, ...]) -> list[int]:
        """``idx`` with its last ⌊share·B⌋ entries replaced by neighbours of its first
        ones (anchor q % anchors for the q-th); a random one, drawn from ``seed``."""
        import numpy as np

        hard = min(int(len(idx) * share), len(idx) - 1)
        if hard <= 0:
            return idx
        rng = np.random.default_rng(list(seed))
        anchors, out = idx[: len(idx) - hard], list(idx)
        for q in range(hard):
            near = self.near.get(self.groups[anchors[q % len(anchors)]])
            if near:
                pairs = self.members[near[int(rng.integers(len(near)))]]
                out[len(anchors) + q] = pairs[int(rng.integers(len(pairs)))]
        return out


def encode_captions(
    tok: Any, captions: list[str], max_length: int, index: dict[str, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, groups) of every caption; ``index`` maps each distinct
    caption to its group id (shared by the train and val splits, extended in place)."""
    import torch

    from genloop.models.clip import encode_texts

    if not captions:
        empty = torch.zeros(0, 1, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.long)
    enc = encode_texts(tok, captions, max_length)
    groups = torch.tensor([index.setdefault(c, len(index)) for c in captions])
    return enc["input_ids"], enc["attention_mask"], groups


def make_objective(
    t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> ContrastiveObjective:
    """The contrastive objective on the dataset's captioned train and val splits."""
    import torch
    from transformers import AutoTokenizer

    from genloop.data.images import caption_split
    from genloop.models.clip import image_size, pixel_stats, text_context, write_clip_tokenizer

    if t.objective != OBJECTIVE:
        raise wrong_family(t.objective)
    if t.batch_size < 2:
        raise ConfigError("the contrastive objective needs train.batch_size ≥ 2 (negatives)")
    images, captions = captioned(data)
    found = caption_split(data.dir, "val")
    val_images, val_captions = found if found is not None else (images[:0], [])
    context = text_context(model)
    # the tokenizer as the saved model will hold it (eos appended): one encoding everywhere
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(_tokenizer_dir(data), Path(tmp), context)
        tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    index: dict[str, int] = {}
    ids, mask, groups = encode_captions(tok, captions, context, index)
    val = (val_images, *encode_captions(tok, val_captions, context, index))
    mean, std = pixel_stats(model)
    hard = t.hard_negatives
    return ContrastiveObjective(
        images=images,
        input_ids=ids,
        attention_mask=mask,
        groups=groups,
        val=val,
        image_size=image_size(model),
        mean=mean,
        std=std,
        batch_size=t.batch_size,
        seed=t.seed,
        device=torch.device(device),
        hard_negatives=hard,
        neighbours=Neighbours.of(ids, mask, groups) if hard > 0 else None,
    )


@dataclass(frozen=True)
class ClipBuilder:
    """The clip family as the loop builds it (see ``families.Builder``)."""

    family: str = "clip"
    sampler: str = "genloop.models.clip:load_clip"  # no sampling: features and scores

    def build_model(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        *,
        trust_pickle: bool = False,  # CLIP models are read from safetensors only
    ) -> BuiltModel:
        return build_model(ws, m, data, device)

    def make_objective(
        self, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
    ) -> ContrastiveObjective:
        return make_objective(t, data, model, device)


BUILDERS = {"clip": ClipBuilder()}
