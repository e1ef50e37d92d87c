"""A preallocated key/value cache with one row ("slot") per running sequence.

Shapes (Llama notation): ``k`` and ``v`` are (L, S, K, T, Q): L layers, S slots, K key/value
heads, T the longest sequence a slot holds, Q the head dim. A sequence owns one slot from
admission to finish; its token at position ``t`` has its keys at ``k[:, slot, :, t]``.

The scheduler keeps running sequences in slots ``0..B-1`` (a finished sequence's slot is
refilled by moving the last one into it, see ``move``), so a decode step reads the cache as
plain views ``k[l, :B, :, :T_max]`` instead of gathering rows.

The cache is zero-filled (never ``empty``): a decode step reads positions past a shorter
sequence's end, masked out of attention, and a masked NaN would still poison the softmax
(0 · NaN = NaN). Filling it commits every page, so the whole cache is resident from the
start: :func:`plan_cache` sizes it against a memory budget before anything is allocated.

Size. Each of S slots holds T = min(context, max_prompt_tokens + max_tokens) positions;
one position takes layers × 2 (keys and values) × K × Q × dtype bytes, so the cache is
S × T × that. ``serve.max_batch_size`` asks for S slots; ``serve.kv_cache_bytes`` caps the
cache, and when S slots do not fit, the engine gets as many as do (printed at startup).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from genloop.errors import GenloopError


class KVCache:
    """Keys and values of every slot, written in place by prefill and decode steps."""

    def __init__(
        self,
        *,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, n_slots, n_kv_heads, max_len, head_dim)
        self.k: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.v: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots = n_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length <= 0:
            return
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])


# ------------------------------------------------------------------------- sizing


def bytes_per_position(config: Any, dtype_bytes: int) -> int | None:
    """Cached bytes of one token for a transformers ``config``: layers × 2 × K × Q × bytes.

    Decoders name their sizes in one of a few ways (Llama's ``num_key_value_heads``,
    GPT-2's ``n_layer``/``n_head``, T5's ``num_layers``/``d_kv``); an encoder-decoder also
    caches the cross-attention keys of the prompt, counted here as a second set per
    position (an upper bound). None when the config names no sizes this reads.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> int | None:
        for name in names:
            value = getattr(text, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    layers = first("num_decoder_layers", "num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head", "num_heads")
    kv_heads = first("num_key_value_heads", "multi_query_group_num") or heads
    width = first("hidden_size", "n_embd", "d_model")
    head_dim = first("head_dim", "d_kv") or (width // heads if width and heads else None)
    if layers is None or kv_heads is None or head_dim is None:
        return None
    sets = 2 if getattr(text, "is_encoder_decoder", False) else 1  # self + cross attention
    return sets * layers * 2 * kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class CachePlan:
    """How many slots the engine gets, and why (see the module docstring)."""

    slots: int
    positions: int  # per slot
    position_bytes: int | None  # None: the model's sizes are unknown, the budget not applied
    requested: int  # serve.max_batch_size
    budget: int  # serve.kv_cache_bytes

    @property
    def nbytes(self) -> int | None:
        if self.position_bytes is None:
            return None
        return self.slots * self.positions * self.position_bytes

    def describe(self) -> str:
        """One line for the startup output."""
        size = self.nbytes
        line = f"batch {self.slots} × {self.positions} positions"
        if size is None:
            return line + " (KV cache size unknown for this architecture)"
        line += f", KV cache {_human(size)}"
        if self.slots < self.requested:
            line += (
                f" (serve.max_batch_size {self.requested} would need "
                f"{_human(self.requested * self.positions * (self.position_bytes or 0))}, "
                f"over serve.kv_cache_bytes {_human(self.budget)})"
            )
        return line


def plan_cache(
    *, position_bytes: int | None, positions: int, max_batch_size: int, budget: int
) -> CachePlan:
    """``max_batch_size`` slots of ``positions`` each, or as many as ``budget`` bytes hold."""
    slots = max_batch_size
    if position_bytes is not None:
        slot_bytes = positions * position_bytes
        slots = min(max_batch_size, budget // slot_bytes)
        if slots < 1:
            raise GenloopError(
                f"one sequence of {positions} positions needs {_human(slot_bytes)} of KV "
                f"cache, more than serve.kv_cache_bytes ({_human(budget)}): raise "
                "serve.kv_cache_bytes, or lower serve.max_prompt_tokens + serve.max_tokens"
            )
    return CachePlan(slots, positions, position_bytes, max_batch_size, budget)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
