"""``genloop export``: a model as one file another runtime loads (GGUF for llama.cpp).

    1. the format and quant type   checked first: a typo costs nothing (exit 2)
    2. the model                   a registered ref (``lm``, ``lm@3``, ``lm@production``,
                                   verified on open) or a local checkpoint directory
    3. the family                  GGUF covers causal LMs of the Llama architecture
    4. the file                    :func:`genloop.optimize.gguf_export.write_gguf`

A quantized genloop variant exports from its dequantized weights; an ONNX variant has no
PyTorch weights, so its parent is the one to export.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from genloop.errors import ConfigError, ConflictError, GenloopError

if TYPE_CHECKING:
    from genloop.optimize.gguf_export import GgufResult
    from genloop.workspace.workspace import Workspace

FORMATS = ("gguf",)


def check_format(fmt: str, quant: str) -> None:
    """ConfigError (exit 2) naming the choices for an unknown format or quant type."""
    from genloop.optimize.gguf_export import check_quant

    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r} (choose from: {', '.join(FORMATS)})")
    check_quant(quant)


def export_model(
    ws: Workspace | None,
    ref: str,
    fmt: str = "gguf",
    *,
    quant: str = "f16",
    output: Path | None = None,
) -> GgufResult:
    """Export model ``ref`` (a ref in ``ws``, or a checkpoint directory) to ``output``
    (default: ``./NAME-vVERSION-QUANT.gguf``)."""
    from genloop.models.pretrained import variant_format
    from genloop.optimize.gguf_export import write_gguf

    # 1. format and quant
    check_format(fmt, quant)
    # 2. the model
    if Path(ref).is_dir():
        from genloop.models.pretrained import inspect_checkpoint

        model_dir = Path(ref)
        family: str = inspect_checkpoint(model_dir).family
        name = model_dir.resolve().name
        where = str(model_dir)
    else:
        from genloop.workspace import registry

        if ws is None:
            raise GenloopError(f"{ref} is not a directory, and no workspace is open to find it")
        info = registry.resolve(ws, ref)
        family = info.family
        model_dir = ws.store.open_verified(info.artifact)
        name = f"{info.name}-v{info.version}"
        where = info.ref
    # 3. the family
    if family != "causal_lm":
        raise GenloopError(
            f"{where} is a {family} model; GGUF export covers causal_lm models of the Llama "
            "architecture (llama.cpp runs decoder-only language models)"
        )
    if variant_format(model_dir) == "onnx":
        raise GenloopError(
            f"{where} is an ONNX variant (no PyTorch weights); export its parent instead"
        )
    # 4. the file
    out = output if output is not None else Path.cwd() / f"{name}-{quant}.gguf"
    if out.exists():
        raise ConflictError(f"{out} already exists; remove it or give another --output")
    return write_gguf(model_dir, out, quant, name=name)
