"""Sentence embeddings from masked_lm model versions: mean-pooled and L2-normalised.

Every ``masked_lm`` version (BERT, ModernBERT, … in the Hugging Face layout, whatever head
it was trained with: MLM, embedding, sequence or token classification) embeds through its
encoder, the model's ``base_model``:

    1. tokenize    the model's own tokenizer, special tokens as it adds them; token ids
                   given by the caller are used as they are
    2. encode      the encoder's ``last_hidden_state`` (B, T, H) over a right-padded batch
    3. pool        the mean over the positions the attention mask keeps (what
                   sentence-transformers' mean pooling does)
    4. normalise   to unit L2 norm, so a dot product is a cosine similarity
    5. truncate    optionally, the first ``dimensions`` coordinates, normalised again
                   (Matryoshka representations, Kusupati et al. 2022); any size up to the
                   hidden size is accepted

The server's embedding engine (``serve/engine/embedder.py``), ``genloop generate --embed``,
the ``retrieval`` evaluation suite and the ``embedding`` training objective all pool and
normalise here, so a text gets the same vector everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import GenloopError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor, nn

EMBEDDING_FAMILIES = ("masked_lm",)
# transformers model types of encoder checkpoints without a genloop.json (a local directory)
ENCODER_MODEL_TYPES = (
    "bert",
    "modernbert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "electra",
    "deberta",
    "deberta-v2",
    "mpnet",
)
HOW_TO_EMBED = (
    "embeddings come from masked_lm models (BERT-style encoders): train one with "
    "model.family masked_lm, or import a BERT-style checkpoint with 'genloop models import'"
)
DEFAULT_CONTEXT = 512  # for a config that states no position limit

Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


def cannot_embed(name: str, family: str) -> GenloopError:
    """The error for a model that cannot embed, naming the fix."""
    return GenloopError(f"model {name} is a {family} model, which cannot embed; {HOW_TO_EMBED}")


def model_dir_family(model_dir: Path) -> str | None:
    """The family ``genloop.json`` records (None: a plain Hugging Face directory)."""
    meta = model_dir / "genloop.json"
    if not meta.is_file():
        return None
    try:
        family = json.loads(meta.read_text()).get("family")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return family if isinstance(family, str) else None


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``hidden`` (B, T, H) over the positions ``mask`` (B, T) keeps: (B, H),
    in float32. A row with no kept position pools to zeros."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * m).sum(dim=1).float()  # (B, H)
    return summed / m.sum(dim=1).float().clamp(min=1.0)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded token ids and their attention mask, (N, T) long each."""
    import torch

    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm (a zero row stays zero)."""
    import torch.nn.functional as F

    return F.normalize(x, p=2.0, dim=-1)


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first ``dimensions`` coordinates of each row, normalised again (None: as is).

    Truncating a unit vector and normalising gives what truncating the pooled vector
    first would have: the norm cancels out."""
    import numpy as np

    if dimensions is None or dimensions == vectors.shape[-1]:
        return vectors
    cut = vectors[..., :dimensions]
    norms = np.linalg.norm(cut, axis=-1, keepdims=True)
    out: np.ndarray = (cut / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def check_dimensions(dimensions: int | None, hidden_size: int) -> None:
    if dimensions is None:
        return
    if not 1 <= dimensions <= hidden_size:
        raise GenloopError(
            f"dimensions is {dimensions}; this model's embeddings have {hidden_size} "
            f"(give 1 to {hidden_size}, or leave it unset)"
        )


@dataclass
class Embedder:
    """A loaded encoder and its tokenizer: texts or token ids in, unit vectors out."""

    encoder: nn.Module  # the model's base_model: input_ids, attention_mask → last_hidden_state
    tokenizer: Any  # a transformers tokenizer
    name: str
    hidden_size: int
    context_length: int  # positions the encoder has embeddings for
    vocab_size: int
    pad_id: int

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``, special tokens as the tokenizer adds them."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        found = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return [list(ids) for ids in found]

    def check_ids(self, ids: Sequence[Sequence[int]], *, truncate: bool = False) -> None:
        """Refuse token ids the encoder cannot read: none, outside the vocabulary, or longer
        than its context (unless ``truncate``: then :meth:`forward` cuts them)."""
        for i, row in enumerate(ids):
            if not row:
                raise GenloopError(f"input {i} has no tokens; embed a non-empty text")
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise GenloopError(
                    f"input {i}: token id {bad[0]} is outside the vocabulary (0 to "
                    f"{self.vocab_size - 1})"
                )
            if len(row) > self.context_length and not truncate:
                raise GenloopError(
                    f"input {i} is {len(row)} tokens; this model reads at most "
                    f"{self.context_length} (shorten it, or truncate)"
                )

    def forward(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit embeddings (N, H) float32 of checked token ids, in one forward pass (rows
        longer than the context are cut to it)."""
        import numpy as np
        import torch

        if not ids:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        input_ids, mask = pad_batch([r[: self.context_length] for r in ids], self.pad_id)
        device = self.device
        with torch.inference_mode():
            out = self.encoder(input_ids=input_ids.to(device), attention_mask=mask.to(device))
            pooled = normalize(mean_pool(out.last_hidden_state, mask.to(device)))  # (N, H)
        result: np.ndarray = pooled.cpu().numpy().astype(np.float32)
        return result

    def embed(
        self,
        inputs: Inputs,
        *,
        dimensions: int | None = None,
        batch_size: int = 32,
        truncate: bool = False,
    ) -> np.ndarray:
        """Embeddings (N, D) float32 of a text, texts, a token array or token arrays (one
        row per input), in batches of ``batch_size`` sorted by length."""
        import numpy as np

        check_dimensions(dimensions, self.hidden_size)
        if batch_size < 1:
            raise GenloopError(f"batch_size must be at least 1, not {batch_size}")
        ids = self.token_ids(inputs)
        self.check_ids(ids, truncate=truncate)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding
        out = np.zeros((len(ids), self.hidden_size), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = self.forward([ids[i] for i in chunk])
        return truncate_dimensions(out, dimensions)

    def token_ids(self, inputs: Inputs) -> list[list[int]]:
        """Each input as token ids: texts tokenized, token arrays as they are."""
        if isinstance(inputs, str):
            return [self.encode(inputs)]
        items: list[Any] = list(inputs)
        if not items:
            raise GenloopError("nothing to embed: the input is empty")
        if all(isinstance(x, int) for x in items):
            return [[int(x) for x in items]]
        if all(isinstance(x, str) for x in items):
            return self.encode_batch(items)
        if all(isinstance(x, Sequence) and not isinstance(x, str) for x in items):
            return [[int(t) for t in x] for x in items]
        raise GenloopError("inputs must be a text, texts, a token array or token arrays")


def load_embedder(model_dir: Path, *, device: str = "cpu", name: str | None = None) -> Embedder:
    """The encoder and tokenizer of a masked_lm model directory (safetensors only, nothing
    downloaded, no remote code), in eval mode on ``device`` (``auto``: CUDA when present).

    A directory whose ``genloop.json`` names another family is refused, naming the fix; a
    plain Hugging Face directory must hold an encoder (``ENCODER_MODEL_TYPES``)."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.masked_lm import frame_tokenizer
    from genloop.security.safe_load import check_safetensors

    model_dir = Path(model_dir)
    label = name or model_dir.name
    family = model_dir_family(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise GenloopError(f"{model_dir} is not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenloopError(f"{config_file}: not valid JSON ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if family is not None and family not in EMBEDDING_FAMILIES:
        raise cannot_embed(label, family)
    if family is None and model_type not in ENCODER_MODEL_TYPES:
        raise cannot_embed(label, f"{model_type or 'unknown'} (no genloop.json)")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise GenloopError(
            f"{model_dir} holds no safetensors weights (genloop reads weights from "
            "safetensors only; convert the checkpoint)"
        )
    check_safetensors(weights)  # a pickle in disguise or a truncated file is refused
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no tqdm in our output
    # the class the checkpoint was saved from (its head's weights load without a report of
    # unexpected keys), then its encoder; AutoModel when the config names no class
    architectures = config.get("architectures") or []
    cls = getattr(transformers, str(architectures[0]), None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    model = cls.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=False, use_safetensors=True
    )
    encoder: nn.Module = model.base_model.to(device).eval()
    hf: Any = encoder.config
    # cls … sep around every text, as the family trains and saves it
    tokenizer = frame_tokenizer(load_hf_tokenizer(model_dir), encoder_context(hf))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(hf, "pad_token_id", None)
    return Embedder(
        encoder=encoder,
        tokenizer=tokenizer,
        name=label,
        hidden_size=int(hf.hidden_size),
        context_length=encoder_context(hf),
        vocab_size=int(hf.vocab_size),
        pad_id=int(pad) if isinstance(pad, int) else 0,
    )


def encoder_context(config: Any) -> int:
    """Positions the encoder has embeddings for (``max_position_embeddings``)."""
    value = getattr(config, "max_position_embeddings", None)
    if isinstance(value, int) and value > 0:
        return value
    return DEFAULT_CONTEXT
