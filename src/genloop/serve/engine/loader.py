"""Build the engine for a model directory: the one place that picks the backend.

The directory is a genloop model version or any local Hugging Face checkpoint of a text
model (``genloop.models.pretrained``: safetensors only, nothing downloaded, no remote
code). The native batched engine (``engine.py``) runs it over one of three runners:

- ``onnx``: an ONNX variant (``genloop optimize --export onnx``) in onnxruntime
  (``onnx_runner.py``), on the device ``genloop.optimize.variant.onnx_device`` names (the
  decision evaluation shares); it has no PyTorch model, so no beam search;
- ``native``: the decoder families of ``architectures.BATCHED_MODEL_TYPES``, batched
  (``runner.DecoderRunner``);
- ``hf``: every other causal or seq2seq model (``runner.HFRunner``).

The server asks :func:`load_text_engine`, which first picks the backend
(``serve.engine``, :func:`select_backend`): the native engine above, or a managed vLLM
process (``vllm.py``) for architectures the native engine does not batch. Both satisfy
``protocol.TextEngine``, so the gateway in front of them is the same. A ``captioning``
model version loads as a :class:`~genloop.serve.engine.captioner.Captioner`
(:func:`load_vision_engine`): images in through the chat endpoint, captions out; a
``masked_lm`` one as an :class:`~genloop.serve.engine.embedder.EmbeddingEngine`
(:func:`load_embedding_engine`): ``/v1/embeddings``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from genloop.errors import GenloopError
from genloop.models.family import IMAGE_FAMILIES
from genloop.serve.engine.engine import Engine
from genloop.serve.engine.kv_cache import CachePlan, bytes_per_position, plan_cache
from genloop.serve.engine.runner import Runner, build_runner

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from genloop.config import ServeConfig
    from genloop.serve.engine.captioner import Captioner
    from genloop.serve.engine.embedder import EmbeddingEngine
    from genloop.serve.engine.protocol import TextEngine
    from genloop.serve.engine.types import EngineObserver
    from genloop.serve.engine.vllm import VllmEngine

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # for models whose config states no limit (T5's relative positions)


Backend = Literal["native", "vllm"]


def load_text_engine(
    model_dir: Path,
    *,
    model_name: str,
    model_version: int | None,
    cfg: ServeConfig,
    observer: EngineObserver | None = None,
) -> TextEngine:
    """The engine the server runs ``model_dir`` on: the backend ``cfg.engine`` picks
    (:func:`select_backend`), not started (``await engine.start()``)."""
    model_dir = Path(model_dir)
    if select_backend(model_dir, model_name=model_name, cfg=cfg) == "vllm":
        return load_vllm_engine(
            model_dir,
            model_name=model_name,
            model_version=model_version,
            cfg=cfg,
            observer=observer,
        )
    return load_engine(
        model_dir, model_name=model_name, model_version=model_version, cfg=cfg, observer=observer
    )


def load_vision_engine(model_dir: Path, *, cfg: ServeConfig) -> Captioner:
    """The captioner of a ``captioning`` model directory (verified against its manifest),
    on ``cfg.device``."""
    from genloop.models.captioning import load_captioner
    from genloop.serve.engine.captioner import Captioner

    model, tokenizer = load_captioner(model_dir, device=resolve_device(cfg.device))
    return Captioner(model, tokenizer)


def load_embedding_engine(
    model_dir: Path, *, model_name: str, model_version: int | None, cfg: ServeConfig
) -> EmbeddingEngine:
    """The embedding engine of a ``masked_lm`` model directory (not started: ``await
    engine.start()``): its encoder on ``cfg.device``, batched within the ``serve.embedding_*``
    limits."""
    from genloop.models.embeddings import load_embedder
    from genloop.serve.engine.embedder import EmbeddingEngine

    embedder = load_embedder(model_dir, device=resolve_device(cfg.device), name=model_name)
    return EmbeddingEngine(
        embedder,
        model_name=model_name,
        model_version=model_version,
        max_batch_inputs=cfg.embedding_batch_size,
        max_batch_tokens=cfg.embedding_batch_tokens,
        max_queue=cfg.max_queue,
        batch_wait_s=cfg.embedding_batch_wait_ms / 1000.0,
    )


def select_backend(model_dir: Path, *, model_name: str, cfg: ServeConfig) -> Backend:
    """``serve.engine`` for this model: ``native`` and ``vllm`` as they say; ``auto`` the
    native engine for the architectures it batches itself
    (``architectures.supports_batching``), vLLM for a causal LM of any other architecture
    when a vLLM environment exists, else native with a warning naming the install command.
    An ONNX variant and a seq2seq model always run natively (vLLM runs neither)."""
    from genloop.optimize.variant import onnx_device
    from genloop.serve.engine.vllm import INSTALL_COMMAND, find_vllm_python, require_vllm_python

    if cfg.engine == "native":
        return "native"
    family = model_family(model_dir)
    onnx = onnx_device(model_dir, cfg.device) is not None
    if cfg.engine == "vllm":
        if family != "causal_lm" or onnx:
            what = "an ONNX variant" if onnx else f"a {family} model"
            raise GenloopError(
                f"model {model_name} is {what}, which vLLM does not run; serve it with "
                "serve.engine native (or auto)"
            )
        vllm_model_dir(model_dir, resolve_device(cfg.device))  # unreadable ones fail now
        require_vllm_python(cfg.vllm.python)
        return "vllm"
    if family != "causal_lm" or onnx:
        return "native"
    from transformers import AutoConfig

    from genloop.serve.engine.architectures import supports_batching

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if supports_batching(config):
        return "native"
    if find_vllm_python(cfg.vllm.python) is not None:
        return "vllm"
    log.warning(
        "model %s (%s) is not batched by the native engine and no vLLM environment was "
        "found: serving it natively, one request at a time per slot. Install vLLM with "
        "'%s' for continuous batching.",
        model_name,
        getattr(config, "model_type", "unknown architecture"),
        INSTALL_COMMAND,
    )
    return "native"


def vllm_model_dir(model_dir: Path, device: str) -> Path:
    """The directory vLLM loads: a quantized variant's compressed-tensors checkpoint
    (``genloop optimize --quantize`` writes it beside genloop's own layout, which vLLM does
    not read), else the model version itself. vLLM's CPU build has no 8-bit weight-only
    kernel ("Quant type (uint8b128) not supported by CPUWNA16"), so an int8 weight-only
    variant is refused on CPU here rather than when vLLM fails to start."""
    from genloop.models.pretrained import optimize_meta, variant_format
    from genloop.workspace.layout import COMPRESSED_DIR

    if variant_format(model_dir) != "quantized":
        return model_dir
    standard = model_dir / COMPRESSED_DIR
    if not (standard / "config.json").is_file():
        raise GenloopError(
            f"{model_dir} is a quantized variant without a {COMPRESSED_DIR}/ checkpoint "
            "(quantized by an older genloop), and vLLM does not read genloop's own layout: "
            "quantize its float parent again, or serve it with serve.engine native"
        )
    scheme = ((optimize_meta(model_dir) or {}).get("quantization") or {}).get("scheme")
    if device == "cpu" and scheme == "int8-weight_only":
        raise GenloopError(
            f"{model_dir} is int8 weight-only (W8A16), which vLLM's CPU build cannot run "
            "(it has int8 kernels for W8A8 and 4-bit weight-only ones): quantize with "
            "--quantize-mode dynamic (W8A8) or int4, or serve it with serve.engine native"
        )
    return standard


def load_vllm_engine(
    model_dir: Path,
    *,
    model_name: str,
    model_version: int | None,
    cfg: ServeConfig,
    observer: EngineObserver | None = None,
) -> VllmEngine:
    """A managed vLLM process for ``model_dir`` (not started; a quantized variant: its
    compressed-tensors checkpoint, :func:`vllm_model_dir`). Only the tokenizer and the
    config are read here; the weights load in vLLM's process."""
    from transformers import AutoConfig

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.serve.engine.vllm import VllmEngine, require_vllm_python

    python = require_vllm_python(cfg.vllm.python)
    tokenizer = load_hf_tokenizer(model_dir)
    config: Any = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    context = min(model_context(config, tokenizer), cfg.max_prompt_tokens + cfg.max_tokens)
    device = resolve_device(cfg.device)
    return VllmEngine(
        vllm_model_dir(model_dir, device),
        tokenizer,
        python=python,
        model_name=model_name,
        model_version=model_version,
        context_length=context,
        vocab_size=int(getattr(config, "vocab_size", None) or len(tokenizer)),
        eos_token_ids=eos_ids(config, generation_config(model_dir), tokenizer),
        device=device,
        max_batch_size=cfg.max_batch_size,
        max_queue=cfg.max_queue,
        request_timeout_s=cfg.request_timeout_s,
        cfg=cfg.vllm,
        observer=observer,
    )


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
    ``min(context, max_prompt_tokens + max_tokens)`` positions, and there are fewer slots
    when that many exceed ``kv_cache_bytes``: ``kv_cache.plan_cache``; the engine's
    ``cache_plan`` says what was decided). ``runner`` forces
    ``"native"`` or ``"hf"`` (tests, benchmarks); an ONNX variant always gets ``"onnx"``.
    """
    from transformers.utils import logging as hf_logging

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.optimize.variant import onnx_device

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no tqdm in server logs
    model_dir = Path(model_dir)
    family = model_family(model_dir)
    if family in IMAGE_FAMILIES or family == "masked_lm":
        kind = "an encoder" if family == "masked_lm" else "an image model"
        raise GenloopError(
            f"model {model_name} is {kind} ({family}); the text engine serves "
            "causal_lm and seq2seq models"
        )
    on_onnx = onnx_device(model_dir, cfg.device)  # None: the model runs in PyTorch
    if on_onnx is not None and runner not in ("auto", "onnx"):
        raise GenloopError(f"model {model_name} is an ONNX variant: it runs on the onnx runner")
    if runner == "onnx" and on_onnx is None:
        raise GenloopError(f"the onnx runner needs an ONNX variant; {model_dir} is not one")
    tokenizer = load_hf_tokenizer(model_dir)
    longest = cfg.max_prompt_tokens + cfg.max_tokens
    model: PreTrainedModel | None = None
    built: Runner
    if on_onnx is not None:  # a graph for onnxruntime beside the model's config files
        from transformers import AutoConfig

        from genloop.optimize.onnx import load_onnx_lm
        from genloop.serve.engine.onnx_runner import OnnxRunner

        config: Any = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        generation = generation_config(model_dir)
        context = min(model_context(config, tokenizer), longest)
        plan = _plan(config, 4, context, cfg)  # the ONNX export is fp32
        lm = load_onnx_lm(model_dir, device=on_onnx, threads=torch.get_num_threads())
        built = OnnxRunner(lm, n_slots=plan.slots, max_len=context)
    else:
        from genloop.models.pretrained import load_pretrained

        model = load_pretrained(model_dir, device=resolve_device(cfg.device))
        config, generation = model.config, getattr(model, "generation_config", None)
        context = min(model_context(config, tokenizer), longest)
        plan = _plan(config, model.dtype.itemsize, context, cfg)
        built = build_runner(model, n_slots=plan.slots, max_len=context, kind=runner)
    engine = Engine(
        built,
        tokenizer,
        model_name=model_name,
        model_version=model_version,
        model=model,
        eos_token_ids=eos_ids(config, generation, tokenizer),
        max_batch_size=plan.slots,
        max_queue=cfg.max_queue,
        request_timeout_s=cfg.request_timeout_s,
        observer=observer,
        family=family,
    )
    engine.cache_plan = plan
    return engine


def _plan(config: Any, dtype_bytes: int, context: int, cfg: ServeConfig) -> CachePlan:
    plan = plan_cache(
        position_bytes=bytes_per_position(config, dtype_bytes),
        positions=context,
        max_batch_size=cfg.max_batch_size,
        budget=cfg.kv_cache_bytes,
    )
    level = logging.WARNING if plan.slots < plan.requested else logging.INFO
    log.log(level, "engine cache: %s", plan.describe())
    return plan


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


def eos_ids(config: Any, generation: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a completion: the generation config's EOS ids, the model
    config's and the tokenizer's (``generation`` may be None)."""
    found: set[int] = set()
    for value in (
        getattr(generation, "eos_token_id", None),
        getattr(config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return sorted(found)


def generation_config(model_dir: Path) -> Any:
    """``model_dir/generation_config.json`` as a ``GenerationConfig``; None without one."""
    if not (model_dir / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(model_dir, local_files_only=True)


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
