"""Which architectures the native engine batches, decided from a model's config alone.

The native runner (``runner.DecoderRunner``) computes a decoder's forward itself, batched
over every sequence of a step, for the families below; it reads each family's weights
through a small adapter (``decoder_weights.py``) and must match the transformers forward
exactly (greedy fp32 output equals ``generate``'s, ``tests/serve/test_runner_families.py``).
Everything else (encoder-decoders, other families, configs using a feature the runner does
not compute) takes the generic one-forward-per-sequence runner.

This module imports no torch: the engine chooser (native or an external server) and
``genloop models import`` ask it about a config before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# transformers ``model_type`` strings the native runner batches
BATCHED_MODEL_TYPES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
)

# the causal LM class transformers builds for each (``Gemma3ForCausalLM`` is the text-only
# Gemma 3; the multimodal ``Gemma3ForConditionalGeneration`` is another model)
CAUSAL_LM_CLASSES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}

# Rope variants whose frequency table does not change with the sequence length (the runner
# computes it once for every position). "dynamic" grows its table with the sequence: not
# batched. "longrope" (Phi-3.5, Phi-4-mini) switches from its short to its long table once a
# forward passes the original context: batched when no sequence gets that long (the serving
# limits say), since then the short table is the one transformers uses throughout.
STATIC_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")

# families whose every layer has the one ``config.sliding_window`` (None: off)
_WHOLE_MODEL_WINDOW = ("mistral", "phi3")
# families with per-layer ``layer_types`` ("sliding_attention" / "full_attention")
_LAYER_TYPED_WINDOW = ("qwen2", "qwen3", "gemma2", "gemma3_text")


def supports_batching(config: Any, *, max_len: int | None = None) -> bool:
    """Whether the native engine batches a model with this transformers ``config`` exactly.

    ``config`` is a ``PretrainedConfig`` or its ``config.json`` as a dict; ``max_len``, when
    known, the longest sequence (prompt + completion) it will serve. False for a family not
    in :data:`BATCHED_MODEL_TYPES` and for a listed one that uses what the runner does not
    compute (a rope table that changes with the length, bidirectional attention,
    cross-attention). A ``longrope`` model is batched only given a ``max_len`` within its
    original context.
    """
    return unsupported_reason(config, max_len=max_len) is None


def unsupported_reason(config: Any, *, max_len: int | None = None) -> str | None:
    """Why the native engine does not batch ``config`` (None when it does)."""
    get = _getter(config)
    model_type = get("model_type")
    if model_type not in BATCHED_MODEL_TYPES:
        return (
            f"model_type {model_type!r} is not one the native engine batches "
            f"({', '.join(BATCHED_MODEL_TYPES)})"
        )
    if get("is_encoder_decoder"):
        return "an encoder-decoder model"
    for rope in _rope_parameter_sets(get("rope_parameters") or get("rope_scaling")):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "longrope":
            original = rope.get("original_max_position_embeddings") or get(
                "original_max_position_embeddings"
            )
            if isinstance(original, int) and max_len is not None and max_len <= original:
                continue
            return (
                f"rope type 'longrope' changes its table past {original} positions "
                "(batched when sequences stay within them)"
            )
        if rope_type not in STATIC_ROPE_TYPES:
            return f"rope type {rope_type!r} changes its table with the sequence length"
    if get("use_bidirectional_attention"):
        return "bidirectional attention"
    if model_type == "gpt2" and get("add_cross_attention"):
        return "GPT-2 with cross-attention"
    if model_type == "gpt_neox" and get("head_dim") not in (None, _head_dim(get)):
        return "GPT-NeoX with a head_dim other than hidden_size / heads"
    return None


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding attention window (None: the layer attends to every position).

    A window W means position ``i`` sees positions ``j`` with ``i - W < j <= i``, as
    transformers' ``sliding_window_overlay`` masks it.
    """
    get = _getter(config)
    model_type = get("model_type")
    n_layers = int(get("num_hidden_layers") or get("n_layer"))
    window = get("sliding_window")
    if model_type in _WHOLE_MODEL_WINDOW:
        return [window] * n_layers
    if model_type in _LAYER_TYPED_WINDOW:
        types = get("layer_types") or ["full_attention"] * n_layers
        return [window if kind == "sliding_attention" else None for kind in types[:n_layers]]
    return [None] * n_layers


def _getter(config: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get
    return lambda key: getattr(config, key, None)


def _head_dim(get: Any) -> int | None:
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else None


def _rope_parameter_sets(rope: Any) -> Iterator[Mapping[str, Any]]:
    """The rope parameter dicts of a config: one, or one per layer type (Gemma 3)."""
    if not isinstance(rope, Mapping):
        return
    nested = [value for value in rope.values() if isinstance(value, Mapping)]
    if nested:
        yield from nested
    else:
        yield rope
