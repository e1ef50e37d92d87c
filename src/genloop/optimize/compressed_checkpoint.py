"""A quantized model as a compressed-tensors checkpoint: what transformers and vLLM load.

genloop's own quantized layout (:mod:`genloop.models.quantized`: ``qweight``, ``scale``,
``scales_and_zeros`` buffers described in ``genloop.json``) is what its kernels take, and
no other runtime reads it. :func:`write_compressed_checkpoint` writes the same codes again
in the compressed-tensors format (the ``compressed-tensors`` package's spec; what
llm-compressor writes and vLLM loads natively, and transformers loads when the package is
installed), into the variant's ``compressed-tensors/`` folder:

=================  ===========================================  ==========================
genloop scheme     compressed-tensors scheme (``format``)       tensors per linear layer
=================  ===========================================  ==========================
int8 dynamic       W8A8: int8 weights per output channel,       ``weight`` (N, K) int8,
                   symmetric; activations int8 per token,       ``weight_scale`` (N, 1)
                   dynamic, symmetric (``int-quantized``)
int8 weight_only   W8A16: the same weights, float activations   ``weight_packed`` (N, K/4)
                   (``pack-quantized``)                          int32, ``weight_scale``,
                                                                ``weight_shape``
int4 weight_only   W4A16_ASYM: groups of G input weights, an    ``weight_packed`` (N, K/8)
                   integer zero point (``pack-quantized``)      int32, ``weight_scale``
                                                                (N, K/G),
                                                                ``weight_zero_point``
                                                                (N/8, K/G) int32,
                                                                ``weight_shape``
=================  ===========================================  ==========================

The weights are the codes genloop's layers hold, bit for bit; no second quantization.
Differences from genloop's own model: activations (int8 dynamic quantizes them per tensor
with fbgemm, W8A8 per token), and the output head, which vLLM does not quantize under
compressed-tensors: it is written as the float values of its quantized weights (so the
logits are genloop's) and listed under ``ignore``, with ``tie_word_embeddings`` false.
vLLM's CPU build runs W8A8 and W4A16 (its kernels: oneDNN int8, ``cpu_gemm_wna16``); W8A16
needs a GPU (its CPU build has no 8-bit weight-only kernel). docs/optimize.md has the
command lines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.models.quantized import Int4Linear, Int8Linear, unpack_int4
from genloop.workspace.layout import SAFETENSORS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HEAD = "lm_head"


def scheme_of(description: dict[str, Any]) -> str:
    """The compressed-tensors preset name of a genloop scheme (``W8A8``, ``W8A16``,
    ``W4A16_ASYM``)."""
    if description["bits"] == "int4":
        return "W4A16_ASYM"
    return "W8A8" if description["mode"] == "dynamic" else "W8A16"


def quantization_config(description: dict[str, Any]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for a genloop quantization description,
    built with compressed-tensors' own models (so it is valid by their spec)."""
    import compressed_tensors
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    int4 = description["bits"] == "int4"
    weights = QuantizationArgs(
        num_bits=4 if int4 else 8,
        type="int",
        strategy="group" if int4 else "channel",
        group_size=int(description["group_size"]) if int4 else None,
        symmetric=not int4,
        dynamic=False,
    )
    activations = None
    if description["mode"] == "dynamic":
        activations = QuantizationArgs(
            num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True
        )
    # weight-only schemes pack their codes into int32 (vLLM reads int-quantized as W8A8)
    fmt = "int-quantized" if activations is not None else "pack-quantized"
    scheme = QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=activations, format=fmt
    )
    ignore = sorted({HEAD, *description.get("skipped", {})})
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        quantization_status="compressed",
        ignore=ignore,
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude={"quant_method"}),
    }


def compressed_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors in compressed-tensors' names: quantized linears as their codes
    and scales, the output head as the float values of its quantized weights, everything
    else as is."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state: dict[str, Tensor] = {}
    owned: set[str] = set()  # state-dict prefixes written here, not copied below
    for name, module in model.named_modules():
        if not isinstance(module, (Int8Linear, Int4Linear)):
            continue
        owned.add(name + ".")
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().float()
        if name == HEAD:
            state[f"{name}.weight"] = module.dequantized()
        elif isinstance(module, Int8Linear):
            q = module.qweight.detach()  # (N, K) int8
            if module.mode == "dynamic":  # int-quantized: the int8 matrix itself
                state[f"{name}.weight"] = q.clone()
            else:  # pack-quantized: four codes to an int32
                state[f"{name}.weight_packed"] = pack_to_int32(q, 8)
                state[f"{name}.weight_shape"] = torch.tensor(list(q.shape))
            state[f"{name}.weight_scale"] = module.scale.detach().float()[:, None]  # (N, 1)
        else:
            codes, scale, zero_point = int4_codes(module)
            # compressed-tensors keeps signed codes: q − 8 and z₀ − 8, w = (q − z₀)·s
            state[f"{name}.weight_packed"] = pack_to_int32((codes - 8).to(torch.int8), 4)
            state[f"{name}.weight_scale"] = scale
            state[f"{name}.weight_zero_point"] = pack_to_int32(
                (zero_point - 8).to(torch.int8), 4, packed_dim=0
            )
            state[f"{name}.weight_shape"] = torch.tensor([module.out_features, module.in_features])
    for key, tensor in model.state_dict().items():
        if not any(key.startswith(prefix) for prefix in owned):
            state[key] = tensor.detach()
    if f"{HEAD}.weight" not in state:  # a float head tied to the embedding: its own copy
        head = model.get_submodule(HEAD)
        assert isinstance(head, nn.Linear)
        state[f"{HEAD}.weight"] = head.weight.detach()
    return {k: v.contiguous().cpu().clone() for k, v in state.items()}


def int4_codes(layer: Int4Linear) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes (N, K) in [0, 15], scale (N, K/G) fp32, zero point (N, K/G) in [0, 15])``
    of an int4 layer, such that ``W = (codes − z₀)·s``."""
    codes = unpack_int4(layer.qweight)
    scale = layer.scales_and_zeros[..., 0].t().float().contiguous()
    zero = layer.scales_and_zeros[..., 1].t().float()
    zero_point = 8.0 - zero / scale
    rounded = torch.round(zero_point)
    if (zero_point - rounded).abs().max() > 1e-3:  # float zeros: genloop before this format
        raise GenloopError(
            "this int4 model has float zero points (quantized by an older genloop); "
            "quantize its float parent again to write a compressed-tensors checkpoint"
        )
    return codes, scale, rounded.clamp(0, 15).to(torch.int32)


def write_compressed_checkpoint(
    model: PreTrainedModel,
    out_dir: Path,
    description: dict[str, Any],
    *,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write ``model`` (quantized by :func:`genloop.optimize.quantize.quantize_model` with
    ``description``) to ``out_dir`` in the compressed-tensors format: ``config.json`` with
    its ``quantization_config``, ``model.safetensors``, the generation config and the
    tokenizer files. Returns ``out_dir``."""
    from safetensors.torch import save_file

    from genloop.data.tokenizer import TOKENIZER_FILES

    out_dir.mkdir(parents=True, exist_ok=False)
    config = model.config.to_dict()
    config["tie_word_embeddings"] = False  # the head has its own (float) weights here
    config["quantization_config"] = quantization_config(description)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    save_file(compressed_state(model), str(out_dir / SAFETENSORS), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = tokenizer_dir / name
            if src.is_file() and not src.is_symlink():
                shutil.copyfile(src, out_dir / name)
    return out_dir
