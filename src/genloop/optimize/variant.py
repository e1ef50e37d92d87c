"""What an optimized model directory holds, read from its ``genloop.json``, and loading it.

An optimized variant records its transform under ``"optimize"`` in ``genloop.json``: at the
top level in a freshly written directory, under ``"config"`` once the registry has stored
it (``register_model`` rewrites the file with the version's metadata). Pruned and distilled
variants are plain checkpoints; a quantized one needs :func:`genloop.optimize.quantize.restore`;
an ONNX one runs in onnxruntime (:func:`genloop.optimize.onnx.load_onnx_lm`).

``genloop.models.pretrained.load_pretrained`` calls :func:`load_optimized` first, so the
evaluator, the serving engine and ``FAMILY.load`` all load quantized variants unchanged.
ONNX variants are refused there; the serving engine (``genloop serve``, ``genloop
generate``) checks :func:`variant_format` first and runs them in onnxruntime
(``genloop.serve.engine.onnx_runner``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import GenloopError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

OPTIMIZE_KEY = "optimize"
ONNX_FILE = "model.onnx"


def optimize_meta(model_dir: Path) -> dict[str, Any] | None:
    """The ``optimize`` entry of ``model_dir/genloop.json``; None for a plain checkpoint."""
    path = Path(model_dir) / "genloop.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenloopError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        return None
    found = meta.get(OPTIMIZE_KEY)
    if found is None and isinstance(meta.get("config"), dict):
        found = meta["config"].get(OPTIMIZE_KEY)
    return found if isinstance(found, dict) else None


def variant_format(model_dir: Path) -> str:
    """``onnx``, ``quantized`` or ``torch`` (a plain Hugging Face checkpoint)."""
    meta = optimize_meta(model_dir) or {}
    if meta.get("format") == "onnx" or (Path(model_dir) / ONNX_FILE).is_file():
        return "onnx"
    if isinstance(meta.get("quantization"), dict):
        return "quantized"
    return "torch"


def load_optimized(
    model_dir: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> PreTrainedModel | None:
    """The model of a quantized variant; None for a plain checkpoint (load it as usual).

    An ONNX variant is refused with a pointer to the onnxruntime loader.
    """
    kind = variant_format(model_dir)
    if kind == "onnx":
        raise GenloopError(
            f"{model_dir} is an ONNX variant: it runs in onnxruntime, not in PyTorch, so it "
            "cannot be trained or fine-tuned (genloop serve, generate and eval run it; from "
            "Python, genloop.optimize.onnx_model.load_onnx_model)"
        )
    if kind == "torch":
        return None
    from genloop.optimize.quantize import restore

    meta = optimize_meta(model_dir)
    assert meta is not None
    return restore(Path(model_dir), meta["quantization"], device=device, dtype=dtype)
