"""T5's span corruption (Raffel et al. 2020, section 3.1.4): the seq2seq pretraining objective.

A window of the token stream is split into spans; 15% of its tokens (``noise_density``),
in spans of 3 on average (``mean_noise_span_length``), are noise. The encoder reads the
window with each noise span replaced by one sentinel token; the decoder writes each
sentinel followed by the span it replaced, then the end-of-sequence token:

    tokens   Thank you for inviting me to your party last week .
    inputs   Thank you <X0> me to your party <X1> week <X2> </s>
    targets  <X0> for inviting <X1> last <X2> . </s>

(Spans as T5's ``random_spans_noise_mask`` draws them: the window starts with kept tokens
and ends inside a noise span, so every target is sentinel, span, sentinel, span … EOS.)
The sentinels are the tokenizer's ``<extra_id_0>``, ``<extra_id_1>`` …
(``tokenizer.sentinel_tokens`` adds them to a BPE tokenizer; T5's own tokenizers have 100).

The counts depend on the window length only, so every example of a run has the same input
and target lengths: windows of ``raw_length`` tokens become inputs of at most ``seq_len``
tokens (:func:`lengths`, T5's ``compute_input_and_target_lengths``) and batches need no
padding. Masks are drawn afresh for each example from ``(seed, position in the data
stream)``: different on every pass over the data, the same after ``--resume``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from genloop.train.objectives import Batch

_TRAIN_STREAM, _VAL_STREAM = 1, 2  # seeds the masks apart from the window order's


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of ``length`` tokens, as T5 counts them:
    round(length × density) noise tokens (at least 1, at most length - 1) in
    round(noise / mean_span) spans (at least 1, at most one per kept token)."""
    if length < 2:
        raise ValueError(f"a window needs at least 2 tokens to corrupt, not {length}")
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = min(max(round(noise / mean_span), 1), length - noise)
    return noise, spans


def lengths(seq_len: int, noise_density: float, mean_span: float) -> tuple[int, int, int]:
    """(raw window, input, target) lengths: the longest window whose corrupted input
    (kept tokens, one sentinel per span, EOS) fits in ``seq_len`` tokens. At ``seq_len``
    512 and T5's settings: 568 raw tokens, 512 in, 114 out."""

    def encoded(raw: int) -> tuple[int, int]:
        noise, spans = span_counts(raw, noise_density, mean_span)
        return raw - noise + spans + 1, noise + spans + 1

    if seq_len < 3:
        raise ConfigError(f"span corruption needs a seq_len of at least 3, not {seq_len}")
    raw = max(2, seq_len - 1)  # spans ≤ noise: the input is never longer than raw + 1
    while encoded(raw + 1)[0] <= seq_len:  # input length grows with raw, by 0 or 1
        raw += 1
    return raw, *encoded(raw)


def _segment_lengths(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """``items`` split into ``segments`` non-empty runs at random cut points (T5's
    ``_random_segmentation``): (segments,) lengths summing to ``items``."""
    cuts = np.sort(rng.choice(np.arange(1, items), size=segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [items]]))


def noise_mask(
    length: int, noise_density: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
    """A (length,) bool mask, True on noise (T5's ``random_spans_noise_mask``): kept and
    noise spans alternate, kept first, with random lengths and the counts of
    :func:`span_counts`."""
    noise, spans = span_counts(length, noise_density, mean_span)
    noise_lengths = _segment_lengths(noise, spans, rng)
    kept_lengths = _segment_lengths(length - noise, spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)  # kept, noise, …
    return np.repeat(np.tile([False, True], spans), interleaved)


def corrupt(
    tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int], eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of ``tokens`` (L,) under ``mask`` (L,): noise span k replaced by
    ``sentinels[k]`` in the inputs; in the targets each ``sentinels[k]`` followed by span
    k. Both end with ``eos``."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    n = int(starts.sum())
    if n > len(sentinels):
        raise GenloopError(f"{n} noise spans but only {len(sentinels)} sentinel tokens")
    marks = np.asarray(sentinels[:n], dtype=tokens.dtype)
    inputs = tokens.copy()
    inputs[starts] = marks
    inputs = inputs[~mask | starts]
    noise_starts = np.cumsum(mask)[starts] - 1  # where each span starts in tokens[mask]
    targets = np.insert(tokens[mask], noise_starts, marks)
    end = np.array([eos], dtype=tokens.dtype)
    return np.concatenate([inputs, end]), np.concatenate([targets, end])


def restore(
    inputs: np.ndarray, targets: np.ndarray, sentinels: Sequence[int], eos: int
) -> np.ndarray:
    """The tokens that :func:`corrupt` turned into ``inputs`` and ``targets``: each sentinel
    in the inputs replaced by what follows it in the targets (EOS dropped from both)."""
    if not len(inputs) or not len(targets) or inputs[-1] != eos or targets[-1] != eos:
        raise ValueError("inputs and targets must both end with the eos token")
    index = {int(s): k for k, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for t in targets[:-1].tolist():
        if t in index:
            current = spans[index[t]] = []
        elif current is None:
            raise ValueError("targets must start with a sentinel token")
        else:
            current.append(t)
    out: list[int] = []
    for t in inputs[:-1].tolist():
        out.extend(spans[index[t]] if t in index else [t])
    return np.array(out, dtype=inputs.dtype)


@dataclass
class SpanCorruption:
    """Span corruption on the dataset's token shards, windows of ``raw_length`` tokens
    (see the module docstring); the seq2seq family's cross-entropy on the targets."""

    tokens_dir: Path
    seq_len: int  # the encoder's input length
    batch_size: int
    seed: int
    device: torch.device
    sentinels: list[int]  # ids of <extra_id_0>, <extra_id_1>, …
    eos_id: int
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    name: str = "span_corruption"
    raw_length: int = field(init=False)
    target_length: int = field(init=False)

    def __post_init__(self) -> None:
        density, mean = self.noise_density, self.mean_noise_span_length
        self.raw_length, _, self.target_length = lengths(self.seq_len, density, mean)
        _, spans = span_counts(self.raw_length, density, mean)
        if spans > len(self.sentinels):
            have = f"has {len(self.sentinels)}" if self.sentinels else "has none"
            raise ConfigError(
                f"span_corruption at seq_len {self.seq_len} needs {spans} sentinel tokens "
                f"<extra_id_0> … <extra_id_{spans - 1}> in the dataset's tokenizer (it {have}): "
                "set tokenizer.sentinel_tokens (e.g. 100) and prepare the dataset again, or "
                "use a tokenizer that has them"
            )

    def _dataset(self, split: str):  # type: ignore[no-untyped-def]
        from genloop.data.pack import TokenDataset

        return TokenDataset(self.tokens_dir, split, self.raw_length)

    def example(
        self, tokens: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one window (raw_length,), its mask drawn from ``rng``."""
        mask = noise_mask(len(tokens), self.noise_density, self.mean_noise_span_length, rng)
        return corrupt(tokens, mask, self.sentinels, self.eos_id)

    def _batch(self, windows: list[np.ndarray], rngs: list[np.random.Generator]) -> Batch:
        import torch

        pairs = [self.example(w, rng) for w, rng in zip(windows, rngs, strict=True)]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))  # (B, ≤ seq_len)
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))  # (B, target_length)
        return {"input_ids": inputs.to(self.device), "labels": labels.to(self.device)}

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        ds = self._dataset("train")
        b = self.batch_size
        batches = ds.batches(b, self.seed, start, rank=rank, world_size=world_size)
        for step, (x, _) in enumerate(batches, start):
            # position of each window in the data stream (as ds.batches orders it)
            first = step * b * world_size + rank * b
            rngs = [np.random.default_rng([self.seed, first + j, _TRAIN_STREAM]) for j in range(b)]
            yield self._batch(list(x), rngs)

    def val_batches(self, n: int) -> list[Batch]:
        try:
            ds = self._dataset("val")
        except GenloopError:
            return []
        if len(ds) == 0:
            return []
        from genloop.train.objectives import spread_batches

        # a fixed sample of windows and masks: comparable across evaluations
        out = []
        for chunk in spread_batches(len(ds), n, self.batch_size):
            rngs = [np.random.default_rng([i, _VAL_STREAM]) for i in chunk]
            out.append(self._batch([ds[i][0] for i in chunk], rngs))
        return out

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        from genloop.models.seq2seq import seq2seq_loss

        loss = seq2seq_loss(
            model, batch, label_smoothing=self.label_smoothing, z_loss_coef=self.z_loss
        )
        return loss, batch["labels"].numel()
