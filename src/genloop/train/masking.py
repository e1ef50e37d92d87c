"""Dynamic masking for masked-LM pretraining (Devlin et al., 2019; RoBERTa's dynamic masks).

Each sequence of a batch gets a fresh mask, drawn from a generator the caller seeds (the
``mlm`` objective seeds it by (seed, micro-step, rank), so a resumed run masks exactly as
the uninterrupted one did):

    1. candidates    every token that is not special (cls, sep, pad, eos, mask, …)
    2. choose        each candidate with probability p (``train.mlm_probability``, 0.15);
                     with whole-word masking each *word* instead, and then all its tokens
    3. replace       of the chosen tokens 80% become the mask token, 10% a random
                     non-special token, 10% stay as they are (the model cannot tell which
                     tokens it is asked about from the input alone)
    4. labels        the original id at chosen positions, -100 everywhere else

A sequence with candidates but nothing chosen gets one (a token, or a word), so no
sequence is without a target. Words (``word_starts``): a token starts a word when its
string starts with a space or line break marker (byte-level BPE's ``Ġ``/``Ċ``,
SentencePiece's ``▁``), or in a WordPiece vocabulary when it does not start with ``##``;
a token right after a special token always starts one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from genloop.errors import GenloopError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # genloop.models.token_loss.IGNORE_INDEX, without importing torch here
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the other 10% stay unchanged
# the first characters of a token that begins a word, per vocabulary style
_BYTE_LEVEL_STARTS = ("Ġ", "Ċ", "ĉ", "č")  # space, \n, \t, \r in GPT-2's byte alphabet
_SENTENCEPIECE_START = "▁"
_WORDPIECE_CONTINUES = "##"


@dataclass(frozen=True)
class Masking:
    """What masking needs to know of the tokenizer, as arrays indexed by token id."""

    mask_id: int
    special: np.ndarray  # (V,) bool: never chosen, never drawn as a replacement
    probability: float = 0.15
    word_start: np.ndarray | None = None  # (V,) bool; set: whole-word masking

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise GenloopError(f"the masking probability must be in (0, 1), not {self.probability}")
        if not (~self.special).any():
            raise GenloopError("every token of the vocabulary is special: nothing to mask")

    @property
    def replacements(self) -> np.ndarray:
        """The ids a chosen token may be replaced by at random (the non-special ones)."""
        return np.flatnonzero(~self.special)


def masking_for(
    tok: PreTrainedTokenizerBase, mask_id: int, probability: float, *, whole_word: bool
) -> Masking:
    """The :class:`Masking` of a tokenizer: its special and added special tokens, and (for
    whole-word masking) which tokens start a word."""
    size = len(tok)
    special = np.zeros(size, dtype=bool)
    ids = set(tok.all_special_ids) | {
        i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    special[[i for i in ids if 0 <= i < size]] = True
    starts = None
    if whole_word:
        names = tok.convert_ids_to_tokens(list(range(size)))
        starts = word_starts(names if isinstance(names, list) else [names])
    return Masking(mask_id, special, probability, starts)


def word_starts(tokens: list[str]) -> np.ndarray:
    """(V,) bool: which tokens begin a word, by the vocabulary's style (module docstring)."""
    strings = [t if isinstance(t, str) else "" for t in tokens]
    if any(t.startswith(_WORDPIECE_CONTINUES) for t in strings):
        return np.array([not t.startswith(_WORDPIECE_CONTINUES) for t in strings])
    if any(t.startswith(_SENTENCEPIECE_START) for t in strings):
        return np.array([t.startswith(_SENTENCEPIECE_START) for t in strings])
    return np.array([t.startswith(_BYTE_LEVEL_STARTS) for t in strings])


def mask_tokens(
    ids: np.ndarray, rng: np.random.Generator, m: Masking
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) for token ids (B, T): see the module docstring. int64 arrays."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise GenloopError(f"expected token ids (B, T), got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= len(m.special)):
        raise GenloopError(
            f"token id {int(ids.max())} is outside the tokenizer's {len(m.special)} tokens"
        )
    candidate = ~m.special[ids]  # (B, T)
    if m.word_start is None:
        word = np.cumsum(candidate, axis=1)  # each candidate token is its own "word"
    else:
        after_special = np.ones_like(candidate)  # the first position starts a word too
        after_special[:, 1:] = ~candidate[:, :-1]
        starts = candidate & (m.word_start[ids] | after_special)
        word = np.cumsum(starts, axis=1)  # (B, T): 1, 2, … word number within its row
    # choose: one draw per (row, word number); a token follows its word's draw
    draws = rng.random((ids.shape[0], ids.shape[1] + 1)) < m.probability  # (B, T+1)
    chosen = candidate & np.take_along_axis(draws, word, axis=1)
    for r in np.flatnonzero(~chosen.any(axis=1) & candidate.any(axis=1)):
        j = rng.choice(np.flatnonzero(candidate[r]))
        chosen[r] = candidate[r] & (word[r] == word[r, j])
    # replace: 80% mask, 10% a random non-special token, 10% unchanged (per token)
    decide = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (decide < MASK_SHARE)] = m.mask_id
    random = chosen & (decide >= MASK_SHARE) & (decide < MASK_SHARE + RANDOM_SHARE)
    inputs[random] = rng.choice(m.replacements, size=int(random.sum()))
    labels = np.where(chosen, ids, IGNORE_INDEX)
    return inputs, labels
