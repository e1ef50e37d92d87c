"""Quantize a model's linear layers, and save the result: ``genloop optimize --quantize``.

:func:`quantize_model` swaps every ``nn.Linear`` for genloop's int8 or int4 layer and
returns the description :func:`save_quantized` stores in ``genloop.json``. The layers,
their kernels and the schemes (int8 dynamic, int8 and int4 weight-only) are
:mod:`genloop.models.quantized`, which also rebuilds a saved model: every loader
(``load_pretrained``) takes a quantized variant as it takes any checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.models.quantized import (
    DEFAULT_GROUP_SIZE,
    QUANT_FORMAT,
    QUANT_FORMAT_VERSION,
    Bits,
    Int4Linear,
    Int8Linear,
    Mode,
    check_scheme,
    is_quantized,
    set_module,
)
from genloop.workspace.layout import COMPRESSED_DIR, GENLOOP_JSON, SAFETENSORS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def scheme_name(bits: str, mode: str) -> str:
    """``int8-dynamic``, ``int8-weight_only``, ``int4-weight_only``."""
    return f"{bits}-{mode}"


def quantize_model(
    model: nn.Module,
    bits: Bits,
    mode: Mode = "dynamic",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> dict[str, Any]:
    """Replace every ``nn.Linear`` of ``model`` in place; the description ``restore`` takes
    (:func:`genloop.models.quantized.restore`).

    The description is JSON: format, bits, mode, group size, the quantized module names
    and the skipped ones with the reason.
    """
    check_scheme(bits, mode, group_size)
    if is_quantized(model):
        raise GenloopError("this model is already quantized; quantize its float parent instead")
    quantized: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        new: nn.Module
        if bits == "int8":
            new = Int8Linear.from_linear(module, mode)
        elif module.in_features % group_size:
            skipped[name] = f"in_features {module.in_features} is not a multiple of {group_size}"
            continue
        else:
            new = Int4Linear.from_linear(module, group_size)
        set_module(model, name, new)
        quantized.append(name)
    if not quantized:
        raise GenloopError("the model has no linear layers this scheme can quantize")
    return {
        "format": QUANT_FORMAT,
        "version": QUANT_FORMAT_VERSION,
        "scheme": scheme_name(bits, mode),
        "bits": bits,
        "mode": mode,
        "group_size": group_size if bits == "int4" else None,
        "modules": quantized,
        "skipped": skipped,
    }


def save_quantized(
    model: PreTrainedModel,
    out_dir: Path,
    description: dict[str, Any],
    *,
    tokenizer_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
    compressed: bool = True,
) -> Path:
    """Write a quantized model: config, safetensors state, tokenizer files, genloop.json,
    and (``compressed``) the same weights as a compressed-tensors checkpoint in
    ``compressed-tensors/``, which transformers and vLLM load
    (:mod:`genloop.optimize.compressed_checkpoint`).

    The config is the float model's (so :func:`~genloop.models.quantized.restore` rebuilds
    the same architecture); ``genloop.json`` gets
    ``{"family", "optimize": {**extra, "quantization": description}}``.
    """
    from safetensors.torch import save_file

    from genloop.data.tokenizer import TOKENIZER_FILES
    from genloop.optimize.compressed_checkpoint import write_compressed_checkpoint

    out_dir.mkdir(parents=True, exist_ok=False)
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:  # a tied weight (the float output head): restore re-ties it
            continue
        seen.add(ptr)
        state[key] = tensor.detach().contiguous().cpu()
    save_file(state, str(out_dir / SAFETENSORS), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = tokenizer_dir / name
            if src.is_file() and not src.is_symlink():
                shutil.copyfile(src, out_dir / name)
    if compressed:
        write_compressed_checkpoint(
            model, out_dir / COMPRESSED_DIR, description, tokenizer_dir=tokenizer_dir
        )
    meta = {"family": "causal_lm", "optimize": {**(extra or {}), "quantization": description}}
    (out_dir / GENLOOP_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir
