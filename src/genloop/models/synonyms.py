"""Synonyms from a masked LM: the nearest whole words in its input-embedding space.

A trained masked LM (BERT, ModernBERT: family ``masked_lm``) places words used in the same
contexts close together in its input embeddings, so a word's nearest neighbours by cosine
similarity are candidate synonyms for augmentation (EDA's ``replace`` and ``insert`` edits,
``genloop.data.augment_text``) without a thesaurus — and in the model's own vocabulary and
language. They are neighbours, not dictionary synonyms: antonyms ("good"/"bad") often sit
close too, which is why ``min_similarity`` exists and why the downstream effect is
measured (``benchmarks/bench_augment.py``).

Only *whole-word* tokens take part: a token whose text is two or more letters and that the
tokenizer gives back alone for ``" " + word`` (so WordPiece's ``##ing`` pieces, byte-level
BPE's mid-word pieces and special tokens are out). A vocabulary can't say whether a
word-initial piece ("Ġhapp") is also a word, so such pieces take part; in a trained model
they are rarely a real word's nearest neighbour. A word that is not one whole-word token has
no neighbours. The word itself, and its other spellings by case, are never its own synonym.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from genloop.errors import GenloopError, NotFoundError
from genloop.workspace.layout import GENLOOP_JSON

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

MASKED_LM = "masked_lm"
_WORD_RE = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


def check_masked_lm(model_dir: Path, what: str) -> None:
    """Raise a clear error unless ``model_dir`` holds a masked LM (``genloop.json`` family
    ``masked_lm``, or a transformers ``*ForMaskedLM`` architecture)."""
    if not (model_dir / "config.json").is_file():
        raise NotFoundError(f"{what} is not a model directory (no config.json in {model_dir})")
    family = None
    meta = model_dir / GENLOOP_JSON
    if meta.is_file():
        try:
            family = json.loads(meta.read_text()).get("family")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            family = None
    if family is None:
        try:
            archs = json.loads((model_dir / "config.json").read_text()).get("architectures")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            archs = None
        if isinstance(archs, list) and any(str(a).endswith("ForMaskedLM") for a in archs):
            return
        family = f"{', '.join(map(str, archs))} model" if isinstance(archs, list) else "model"
    elif family == MASKED_LM:
        return
    raise GenloopError(
        f"{what} is a {family}, not a masked LM; synonyms come from the input embeddings of a "
        "masked LM (family masked_lm: BERT, ModernBERT): train or import one and pass it"
    )


class EmbeddingNeighbours:
    """``neighbours(word)``: up to ``k`` whole words nearest to ``word`` by cosine
    similarity of input embeddings (at least ``min_similarity``), best first."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        tokenizer: PreTrainedTokenizerBase,
        *,
        k: int = 5,
        min_similarity: float = 0.0,
    ) -> None:
        import torch

        if k < 1:
            raise GenloopError(f"k must be at least 1, not {k}")
        self.k = k
        self.min_similarity = min_similarity
        self.tokenizer = tokenizer
        ids, words = whole_word_tokens(tokenizer, embeddings.shape[0])
        if not ids:
            raise GenloopError("the tokenizer has no whole-word tokens to take synonyms from")
        self.words = words  # (N,) the whole words, row i ↔ token ids[i]
        self._row = {token: i for i, token in enumerate(ids)}
        vectors = embeddings.detach().float()[torch.tensor(ids)]
        self._unit = torch.nn.functional.normalize(vectors, dim=1)  # (N, d)
        self._lookup = lru_cache(maxsize=65536)(self._neighbours)

    def __call__(self, word: str) -> list[str]:
        return list(self._lookup(word))

    def token_row(self, word: str) -> int | None:
        """The row of ``word``'s whole-word token (as written, else lowercased), or None."""
        for form in dict.fromkeys((word, word.lower())):
            ids = self.tokenizer.encode(" " + form, add_special_tokens=False)
            if len(ids) == 1 and ids[0] in self._row:
                return self._row[ids[0]]
        return None

    def _neighbours(self, word: str) -> tuple[str, ...]:
        row = self.token_row(word)
        if row is None:
            return ()
        sims = self._unit @ self._unit[row]  # (N,) cosine similarity to the word
        order = sims.argsort(descending=True).tolist()
        lowered = word.lower()
        out: list[str] = []
        for i in order:
            if float(sims[i]) < self.min_similarity or len(out) == self.k:
                break
            if self.words[i].lower() != lowered and self.words[i] not in out:
                out.append(self.words[i])
        return tuple(out)


def whole_word_tokens(
    tokenizer: PreTrainedTokenizerBase, vocab_rows: int
) -> tuple[list[int], list[str]]:
    """(token ids, words) of the vocabulary's whole-word tokens (module docstring)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(len(tokenizer), vocab_rows)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    candidates = [
        (i, t.strip())
        for i, t in zip(ids, texts, strict=True)
        if len(t.strip()) >= 2 and _WORD_RE.fullmatch(t.strip())
    ]
    if not candidates:
        return [], []
    encoded = tokenizer([" " + w for _, w in candidates], add_special_tokens=False)["input_ids"]
    kept = [(i, w) for (i, w), e in zip(candidates, encoded, strict=True) if list(e) == [i]]
    return [i for i, _ in kept], [w for _, w in kept]


def load_neighbours(
    model_dir: Path, *, what: str | None = None, k: int = 5, min_similarity: float = 0.0
) -> EmbeddingNeighbours:
    """The synonym source of the masked LM in ``model_dir`` (safetensors weights only)."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    from genloop.data.tokenizer import load_hf_tokenizer

    what = what or str(model_dir)
    check_masked_lm(model_dir, what)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model = AutoModelForMaskedLM.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise GenloopError(
            f"{what}: its masked LM could not be loaded from safetensors weights ({exc})"
        ) from None
    embeddings = model.get_input_embeddings().weight  # (vocab, d)
    tokenizer = load_hf_tokenizer(model_dir)
    return EmbeddingNeighbours(embeddings, tokenizer, k=k, min_similarity=min_similarity)
