"""Build an :class:`~genloop.serve.engine.engine.Engine` from a model directory.

The directory is a genloop model version or any local Hugging Face checkpoint of a text
model (``genloop.models.pretrained``: safetensors only, nothing downloaded, no remote
code). Llama-style decoders get the fast runner; every other causal or seq2seq model the
generic one (``runner.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from genloop.errors import GenloopError
from genloop.serve.engine.engine import Engine
from genloop.serve.engine.runner import build_runner

if TYPE_CHECKING:
    from genloop.config import ServeConfig
    from genloop.serve.engine.types import EngineObserver

IMAGE_FAMILIES = ("vae", "gan", "diffusion")
DEFAULT_CONTEXT = 2048  # for models whose config states no limit (T5's relative positions)


def load_engine(
    model_dir: Path,
    *,
    model_name: str,
    model_version: int | None,
    cfg: ServeConfig,
    observer: EngineObserver | None = None,
    runner: str = "auto",
) -> Engine:
    """Load the model and tokenizer in ``model_dir`` into a new engine.

    ``cfg`` gives the device, batch size, queue length, timeouts and the longest prompt and
    completion (they bound the cache: each of ``max_batch_size`` slots holds
    ``min(context, max_prompt_tokens + max_tokens)`` positions). ``runner`` forces
    ``"llama"`` or ``"hf"`` (tests, benchmarks).
    """
    from transformers.utils import logging as hf_logging

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.pretrained import load_pretrained

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no tqdm in server logs
    model_dir = Path(model_dir)
    family = model_family(model_dir)
    if family in IMAGE_FAMILIES:
        raise GenloopError(
            f"model {model_name} is an image model ({family}); the text engine serves "
            "causal_lm and seq2seq models"
        )
    device = resolve_device(cfg.device)
    model = load_pretrained(model_dir, device=device)
    tokenizer = load_hf_tokenizer(model_dir)
    context = min(model_context(model.config, tokenizer), cfg.max_prompt_tokens + cfg.max_tokens)
    built = build_runner(model, n_slots=cfg.max_batch_size, max_len=context, kind=runner)
    return Engine(
        built,
        tokenizer,
        model_name=model_name,
        model_version=model_version,
        model=model,
        eos_token_ids=eos_ids(model, tokenizer),
        max_batch_size=cfg.max_batch_size,
        max_queue=cfg.max_queue,
        request_timeout_s=cfg.request_timeout_s,
        observer=observer,
        family=family,
    )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GenloopError("serve.device is 'cuda' but no CUDA device is available")
    return device


def model_context(config: Any, tokenizer: Any) -> int:
    """The longest sequence the model was built for (positions it has embeddings for)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_CONTEXT


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a completion: the generation config's EOS ids and the tokenizer's."""
    found: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return sorted(found)


def model_family(model_dir: Path) -> str:
    """The family of a model directory: its ``genloop.json``, else its transformers config."""
    meta = model_dir / "genloop.json"
    if meta.is_file():
        try:
            family = json.loads(meta.read_text()).get("family")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            family = None
        if isinstance(family, str):
            return family
    if not (model_dir / "config.json").is_file():
        raise GenloopError(f"{model_dir} is not a model directory (no config.json)")
    from genloop.models.pretrained import inspect_checkpoint

    return inspect_checkpoint(model_dir).family
