"""Which model architectures the native engine batches itself.

``serve.engine: auto`` serves these in process and hands every other architecture to a
managed vLLM process (``vllm.py``), when a vLLM environment exists.
"""

from __future__ import annotations

from typing import Any

BATCHED_MODEL_TYPES: tuple[str, ...] = ("llama",)


def supports_batching(config: Any) -> bool:
    return getattr(config, "model_type", None) in BATCHED_MODEL_TYPES
