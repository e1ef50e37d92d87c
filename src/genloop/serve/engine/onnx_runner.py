"""The engine's runner for an ONNX variant (``genloop optimize --export onnx``), in onnxruntime.

The exported graph (``genloop.optimize.onnx``) is one decoder step of any length with the
key/value cache as explicit inputs and outputs: ``input_ids`` (B, T), ``attention_mask``
(B, P + T) with 0 = not attended, ``position_ids`` (B, T) and per layer a past (B, K, P, Q);
out come logits (B, T, V) and the present (B, K, P + T, Q). The runner keeps the cache
itself, one slot per running sequence (``kv_cache.KVCache``: per layer (S, K, T, Q), a
sequence's positions 0..len-1 at the start of its slot), and feeds the graph from it:

- decode, batched: one call for every decoding sequence. The past is the slots' caches up
  to the longest length P (a shorter sequence leaves a gap between its last position and
  P); the mask is 1 on each row's own positions, 0 on its gap, 1 on the new token; the
  position ids are each row's own position. The graph's causal mask (queries at index P
  see keys 0..P) combined with the padding mask makes the gap invisible, so a row's logits
  are those it gets decoding alone (``tests/serve/test_onnx_engine.py`` checks it, within
  float rounding; greedy tokens match the PyTorch engine's). Each row's new key and value,
  the present's last position, go into its slot at its own position.
- prefill, per chunk: batch 1, past = the slot's cache before the chunk, mask all ones,
  positions ``start..start+T``; the present's new positions go into the slot.

Every call copies the past it feeds (onnxruntime takes contiguous arrays) and gets it back
grown by the new positions, of which only those are kept: simple, and about as costly as
the attention over that past, which the graph computes anyway. No beam search:
the engine has no PyTorch model to run ``generate`` on, and refuses ``num_beams > 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from genloop.errors import GenloopError
from genloop.serve.engine.kv_cache import KVCache
from genloop.serve.engine.runner import Chunk, decode_then_prefill

if TYPE_CHECKING:
    from genloop.optimize.onnx import OnnxCausalLM, Past


class OnnxRunner:
    """Batched decode and per-chunk prefill of an exported causal LM over a slot cache."""

    kind = "onnx"

    def __init__(
        self, lm: OnnxCausalLM, *, n_slots: int, max_len: int, prefill_chunk: int = 512
    ) -> None:
        self.lm = lm
        self.n_slots = n_slots
        self.max_len = max_len
        self.prefill_chunk: int | None = prefill_chunk
        self.vocab_size = lm.vocab_size
        self.n_layers = lm.num_layers
        self.cache = KVCache(
            n_layers=lm.num_layers,
            n_slots=n_slots,
            n_kv_heads=lm.num_kv_heads,
            max_len=max_len,
            head_dim=lm.head_dim,
        )
        self._positions = torch.arange(max_len)

    def step(
        self,
        chunks: Sequence[Chunk],
        slots: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
    ) -> Tensor | None:
        """The decode rows in one call, then each chunk in its own; logits (rows, V) fp32."""
        return decode_then_prefill(self, chunks, slots, token_ids, positions)

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> Tensor:
        """One token for each sequence, all in one call; the next-token logits (B, V)."""
        b = len(slots)
        pos = torch.tensor(list(positions))  # (B,) = each slot's cached length
        longest = int(pos.max())
        if longest >= self.max_len:
            raise GenloopError(f"decode at position {longest} past {self.max_len}")
        index = torch.tensor(list(slots))
        past: Past = tuple(
            (
                self.cache.k[i, :, :, :longest].index_select(0, index),  # (B, K, P, Q)
                self.cache.v[i, :, :, :longest].index_select(0, index),
            )
            for i in range(self.n_layers)
        )
        own = self._positions[:longest][None, :] < pos[:, None]  # (B, P): 0 on the gap
        mask = torch.cat([own.long(), torch.ones(b, 1, dtype=torch.long)], dim=1)
        ids = torch.tensor(list(token_ids))[:, None]
        logits, present = self.lm.forward(ids, mask, pos[:, None], past)
        for i, (k, v) in enumerate(present):  # (B, K, P + 1, Q): keep the new position
            self.cache.k[i][index, :, pos] = k[:, :, longest]
            self.cache.v[i][index, :, pos] = v[:, :, longest]
        return logits[:, -1]

    def prefill(
        self,
        slot: int,
        token_ids: Sequence[int],
        start: int,
        *,
        want_logits: bool,
        all_logits: bool = False,
    ) -> Tensor | None:
        """Positions ``start..start+T`` of one sequence; the next-token logits (V,) if
        ``want_logits``, every position's (T, V) if ``all_logits`` (the forward computes
        them all anyway)."""
        t = len(token_ids)
        end = start + t
        if t == 0 or end > self.max_len:
            raise GenloopError(f"prefill of positions {start}..{end} past {self.max_len}")
        past: Past = tuple(
            (
                self.cache.k[i, slot : slot + 1, :, :start],
                self.cache.v[i, slot : slot + 1, :, :start],
            )
            for i in range(self.n_layers)
        )
        ids = torch.tensor([list(token_ids)])
        mask = torch.ones(1, end, dtype=torch.long)
        logits, present = self.lm.forward(ids, mask, self._positions[start:end][None], past)
        for i, (k, v) in enumerate(present):  # (1, K, end, Q): keep start..end
            self.cache.k[i, slot, :, start:end] = k[0, :, start:]
            self.cache.v[i, slot, :, start:end] = v[0, :, start:]
        if all_logits:
            return logits[0].float()
        return logits[0, -1] if want_logits else None

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def release(self, slot: int) -> None:
        pass  # positions past a sequence's end are masked (or overwritten); nothing to clear
