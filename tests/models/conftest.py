"""Tiny models for the family tests: 2 layers, 64 wide, a 128-token vocabulary."""

from __future__ import annotations

from typing import Any

import pytest
import torch

TINY_LLAMA: dict[str, Any] = {
    "preset": "tiny",
    "vocab_size": 128,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "n_kv_head": 2,
    "context_length": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
TINY_T5: dict[str, Any] = {
    "preset": "tiny",
    "vocab_size": 128,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
}


@pytest.fixture
def llama() -> Any:
    from genloop.models.causal_lm import FAMILY

    torch.manual_seed(0)
    return FAMILY.build(TINY_LLAMA)


@pytest.fixture
def t5() -> Any:
    from genloop.models.seq2seq import FAMILY

    torch.manual_seed(0)
    return FAMILY.build(TINY_T5)


@pytest.fixture
def tokens() -> torch.Tensor:
    """(2, 16) token ids that avoid the special ids 0-2."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (2, 16), generator=generator)
