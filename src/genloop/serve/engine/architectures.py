"""The model architectures genloop's native engine batches (continuous batching, slot KV cache)."""

from __future__ import annotations

from typing import Any

BATCHED_MODEL_TYPES: tuple[str, ...] = ("llama",)


def supports_batching(config: Any) -> bool:
    return getattr(config, "model_type", None) in BATCHED_MODEL_TYPES
