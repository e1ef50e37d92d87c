"""Choosing tokens and turning them into text: per-request sampling, logprobs, stop strings.

``sample`` picks one token per row of a (N, V) logits batch, each row with its own
:class:`~genloop.serve.engine.types.SamplingParams`:

- temperature 0 is greedy (``argmax``, the first of equal maxima, as Hugging Face does);
- otherwise the logits are divided by the temperature, cut to the ``top_k`` best and to
  the nucleus (the fewest tokens whose probability reaches ``top_p``), in that order, as
  transformers' warpers do, and a token is drawn by inverting the CDF with one uniform
  number from the request's own random stream (``make_generator``). A request with a
  seed gets a stream seeded with it, so its tokens do not depend on which other requests
  share the batch (as long as the logits themselves agree, which batched float sums make
  true to the last bit almost always);
- logprobs are those of the model's distribution (``log_softmax`` of the raw logits,
  before temperature and cuts), as the OpenAI API reports them.

Text. :class:`IncrementalDetokenizer` turns one token at a time into the text it adds,
holding back an incomplete UTF-8 character (byte-level BPE splits them across tokens) and
decoding a few earlier tokens as context (SentencePiece drops a word's leading space when
it decodes it alone) - the offsets scheme of vLLM and text-generation-inference.
:class:`StopStrings` finds stop strings in the text as it grows and holds back the tail
that could still become one, so a streamed client never sees part of a stop string.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from genloop.serve.engine.types import SamplingParams

_CONTEXT_TOKENS = (
    5  # earlier tokens decoded with each new one (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
)


@dataclass
class Sampled:
    """The chosen token of one row, and its logprobs when asked for."""

    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), best first


def make_generator(seed: int | None) -> random.Random:
    """A request's own random stream: seeded when it asks for a seed, fresh otherwise.

    One uniform number per token is all sampling needs, and Python's Mersenne Twister
    gives it without a tensor op per row.
    """
    seed = seed if seed is not None else secrets.randbits(64)
    return random.Random(seed)  # noqa: S311  # sampling, not secrets


def sample(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[random.Random]
) -> list[Sampled]:
    """One token per row of ``logits`` (N, V), each row by its own params and generator."""
    n, vocab = logits.shape
    logits = logits.float()
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    greedy = len(drawn) < n
    chosen = logits.argmax(dim=-1) if greedy else None  # greedy rows keep these
    if drawn:
        every = len(drawn) == n
        index = None if every else torch.tensor(drawn, device=logits.device)
        x = logits if index is None else logits.index_select(0, index)
        temps = [params[i].temperature for i in drawn]
        if any(t != 1.0 for t in temps):
            x = x / torch.tensor(temps, device=x.device)[:, None]
        x = _top_k(x, [params[i].top_k or 0 for i in drawn])
        x = _top_p(x, [params[i].top_p for i in drawn])
        probs = torch.softmax(x, dim=-1)
        cdf = probs.cumsum(dim=-1)  # (n, V)
        u = torch.tensor([[generators[i].random()] for i in drawn], device=cdf.device)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)
        picked = picked[:, 0]
        # rounding can land past the last token with any probability: take the best then
        zero = probs.gather(1, picked[:, None])[:, 0] <= 0
        if bool(zero.any()):
            picked = torch.where(zero, probs.argmax(dim=-1), picked)
        if chosen is None:
            chosen = picked
        else:
            assert index is not None
            chosen = chosen.index_copy(0, index, picked)
    assert chosen is not None
    tokens: list[int] = chosen.tolist()
    out = [Sampled(t) for t in tokens]
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        index = torch.tensor(wanted, device=logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1)
        picked_lp = logprobs.gather(1, chosen.index_select(0, index)[:, None])[:, 0].tolist()
        k = max(params[i].logprobs or 0 for i in wanted)
        top_v: list[list[float]] = []
        top_i: list[list[int]] = []
        if k > 0:
            values, ids = logprobs.topk(min(k, vocab), dim=-1)
            top_v, top_i = values.tolist(), ids.tolist()
        for row, i in enumerate(wanted):
            out[i].logprob = picked_lp[row]
            ki = params[i].logprobs or 0
            if ki > 0:
                out[i].top = list(zip(top_i[row][:ki], top_v[row][:ki], strict=True))
    return out


def _top_k(x: Tensor, ks: list[int]) -> Tensor:
    vocab = x.shape[-1]
    if not any(0 < k < vocab for k in ks):
        return x
    kmax = min(max(ks), vocab)
    values = x.topk(kmax, dim=-1).values  # (n, kmax), best first
    kth = torch.tensor([min(k, kmax) - 1 if 0 < k < vocab else kmax - 1 for k in ks])
    threshold = values.gather(1, kth.to(x.device)[:, None])  # (n, 1)
    no_cut = torch.tensor([not 0 < k < vocab for k in ks], device=x.device)[:, None]
    return x.masked_fill((x < threshold) & ~no_cut, float("-inf"))


def _top_p(x: Tensor, ps: list[float]) -> Tensor:
    if all(p >= 1.0 for p in ps):
        return x
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    top_p = torch.tensor(ps, device=x.device)[:, None]
    drop = before >= top_p  # the best token always stays (before = 0 < top_p)
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


# ---------------------------------------------------------------------------- text


def make_decode(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """``ids -> text`` without special tokens; the Rust decoder directly when that gives
    the same text as the transformers tokenizer (no clean-up pass), which is much faster."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):

        def fast(ids: Sequence[int]) -> str:
            text: str = backend.decode(list(ids), skip_special_tokens=True)
            return text

        return fast

    def slow(ids: Sequence[int]) -> str:
        text: str = tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    return slow


class IncrementalDetokenizer:
    """The text each new token adds, decoded with a little context before it."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # _ids[_prefix:_read] decodes to the text already returned's tail
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            # keep the window short: only the last few tokens matter as context
            if self._prefix > 4 * _CONTEXT_TOKENS:
                cut = self._prefix - _CONTEXT_TOKENS
                self._ids = self._ids[cut:]
                self._prefix -= cut
                self._read -= cut
            return full_text[len(prefix_text) :]
        return ""  # an incomplete character: wait for the next token


class StopStrings:
    """The completion text so far, cut at the first stop string, streamed safely."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self._sent = 0  # characters already handed out

    def add(self, new_text: str) -> tuple[str, bool]:
        """Append ``new_text``; return (text safe to send now, whether a stop string matched)."""
        start = max(0, len(self.text) - self._longest + 1)
        self.text += new_text
        if self.stops:
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.flush(), True
        safe = len(self.text) - self._held()
        delta = self.text[self._sent : safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return delta, False

    def flush(self) -> str:
        """Everything not yet sent (the request is finishing)."""
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta

    def _held(self) -> int:
        """How many trailing characters could still be the start of a stop string."""
        held = 0
        tail = self.text[-self._longest :] if self._longest else ""
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(tail)), held, -1):
                if tail.endswith(stop[:k]):
                    held = k
                    break
        return held
