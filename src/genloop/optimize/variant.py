"""Which runtime runs a model directory: onnxruntime for an ONNX variant, else PyTorch.

Evaluation (``genloop eval``) and serving (``genloop serve``, ``genloop generate``) ask
:func:`onnx_device`, the one place that decides; an ONNX variant then runs in onnxruntime
(``genloop.optimize.onnx``, ``genloop.serve.engine.onnx_runner``), anything else through
``genloop.models.pretrained.load_pretrained``, which reads what a variant holds
(:func:`~genloop.models.pretrained.variant_format`), rebuilds a quantized one and refuses
an ONNX one (it has no weights to train).
"""

from __future__ import annotations

from pathlib import Path


def onnx_device(model_dir: Path, device: str) -> str | None:
    """Where ``model_dir`` runs in onnxruntime when it is an ONNX variant; None: in PyTorch.

    Evaluation and serving both ask this. An ONNX variant takes the CPU unless ``device``
    names CUDA: "auto" picks a GPU for PyTorch when torch sees one, but onnxruntime's CUDA
    build is a separate install (onnxruntime-gpu).
    """
    from genloop.models.pretrained import variant_format  # torch: imported on first use

    if variant_format(model_dir) != "onnx":
        return None
    return "cuda" if str(device).startswith("cuda") else "cpu"
