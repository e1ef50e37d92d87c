"""A captioning model version behind the chat endpoint: images in, one caption each.

:class:`Captioner` wraps the ``captioning`` family's model and tokenizer
(``genloop.models.captioning``) for the server: it says how large an image the encoder
reads, how long a caption the decoder's positions allow, and captions a batch of uint8
images with the generated token count and why each caption ended. It is not thread-safe
and needs no batching: the server runs one captioning call at a time per model version
(``LoadedModel.run_exclusive``), in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Caption:
    text: str
    completion_tokens: int  # generated tokens, eos included when the caption ended with it
    finish_reason: Literal["stop", "length"]  # length: cut at max_new_tokens


class Captioner:
    """One loaded captioning model version (satisfies ``protocol.ImageCaptioner``)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        from genloop.models.captioning import hf_config

        cfg = hf_config(model)
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(cfg.encoder.image_size)
        patches = self.image_size // int(cfg.encoder.patch_size)
        self.image_tokens = 1 + patches * patches  # [CLS] + patches: what the encoder reads
        self.max_new_tokens = int(cfg.decoder.max_position_embeddings) - 1  # after the start
        self.eos_token_id = int(cfg.eos_token_id)

    def caption(
        self, images_uint8: torch.Tensor, max_new_tokens: int, num_beams: int = 1
    ) -> list[Caption]:
        """One caption per image of ``images_uint8`` (N, C, H, W): greedy search (beam
        search with ``num_beams`` > 1), at most ``max_new_tokens`` tokens each."""
        from genloop.models.captioning import caption_ids

        ids = caption_ids(self.model, images_uint8, max_new_tokens, num_beams)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [
            Caption(
                text=text.strip(),
                completion_tokens=len(row),
                finish_reason="stop" if row and row[-1] == self.eos_token_id else "length",
            )
            for text, row in zip(texts, ids, strict=True)
        ]
