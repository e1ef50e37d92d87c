"""A preallocated key/value cache with one row ("slot") per running sequence.

Shapes (Llama notation): ``k`` and ``v`` are (L, S, K, T, Q): L layers, S slots, K key/value
heads, T the longest sequence a slot holds, Q the head dim. A sequence owns one slot from
admission to finish; its token at position ``t`` has its keys at ``k[:, slot, :, t]``.

The scheduler keeps running sequences in slots ``0..B-1`` (a finished sequence's slot is
refilled by moving the last one into it, see ``move``), so a decode step reads the cache as
plain views ``k[l, :B, :, :T_max]`` instead of gathering rows.

The cache is zero-filled (never ``empty``): a decode step reads positions past a shorter
sequence's end, masked out of attention, and a masked NaN would still poison the softmax
(0 · NaN = NaN). Zero pages are committed lazily by the OS, so a large cache that is
mostly unused costs little memory.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
