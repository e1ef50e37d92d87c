"""Quantized linear layers on PyTorch's own kernels, and rebuilding a saved quantized model.

A quantized model (:mod:`genloop.optimize.quantize` makes one) has every ``nn.Linear``
(the attention and MLP projections and the output head) replaced by a module holding
integer weights and float scales as ordinary buffers, so the state dict is a flat mapping
of tensors: ``model.safetensors`` stores it as is (no pickle), and :func:`restore`
rebuilds the modules from ``genloop.json``'s description. ``load_pretrained`` calls it, so
every loader (evaluation, serving, ``FAMILY.load``) takes a quantized variant unchanged.
The embedding table, norms and biases stay in floating point; a tied output head is
quantized on its own and the embedding keeps its float copy.

Schemes (W: weight (N, K) = (out, in), x: activations (M, K)):

``int8`` ``dynamic``
    W per output channel, symmetric: ``W ≈ q·s`` with q ∈ [-127, 127]. Activations are
    quantized per call (per tensor, asymmetric) and the matmul runs in int8 with int32
    accumulation: fbgemm's ``quantized::linear_dynamic`` (the x86 engine). CPU only.
    Fastest on CPU for prompts and batches; it is what ``torch.ao`` ``quantize_dynamic``
    computes, without its (deprecated) module classes in the saved state.
``int8`` ``weight_only``
    Same weights; activations stay float. CPU: ``aten._weight_int8pack_mm`` on bf16
    activations (fast for decoding one token at a time); other devices dequantize on the
    fly (``x·qᵀ·s``, exact for a per-channel scale).
``int4`` ``weight_only``
    Groups of ``group_size`` input weights, asymmetric with an integer zero point:
    ``W ≈ (q − z₀)·s`` with q, z₀ ∈ [0, 15] (GPTQ's and compressed-tensors' ``W4A16_ASYM``,
    so :mod:`genloop.optimize.compressed_checkpoint` writes the very same codes), stored
    as the kernels take it, ``(q − 8)·s + z`` with ``z = (8 − z₀)·s``, two codes per byte.
    CPU: ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations; N a multiple of 16);
    CUDA: ``aten._weight_int4pack_mm`` (tinygemm) where the shapes allow it; otherwise
    dequantized on the fly. Layers whose input width is not
    a multiple of the group size stay float (listed under ``skipped``).

Whether a path is fast depends on the CPU (``benchmarks/bench_optimize.py`` measures it).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.workspace.layout import SAFETENSORS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Bits = Literal["int8", "int4"]
Mode = Literal["dynamic", "weight_only"]
QUANT_FORMAT = "genloop-quant"
QUANT_FORMAT_VERSION = 1
DEFAULT_GROUP_SIZE = 32
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels take
SCHEMES: dict[str, tuple[str, ...]] = {"int8": ("dynamic", "weight_only"), "int4": ("weight_only",)}


def check_scheme(bits: str, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Raise a GenloopError naming the valid choices unless (bits, mode) is a scheme."""
    if bits not in SCHEMES:
        raise GenloopError(f"unknown quantization {bits!r} (choose from: {', '.join(SCHEMES)})")
    if mode not in SCHEMES[bits]:
        raise GenloopError(
            f"{bits} quantization has no {mode!r} mode (modes: {', '.join(SCHEMES[bits])}); "
            "int4 is weight-only"
        )
    if bits == "int4" and group_size not in GROUP_SIZES:
        raise GenloopError(
            f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}"
        )


@functools.cache
def _cpu_has_vnni() -> bool:
    """AVX512-VNNI / AVX-VNNI accumulate u8·s8 products in int32 without saturating."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# ------------------------------------------------------------------------------ int8


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``(q (N, K) int8, scale (N,) fp32)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x·Wᵀ + b`` with W stored as int8 (N, K) and a per-channel scale (N,)."""

    qweight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: Mode) -> None:
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: tuple[tuple[Any, ...], Any] | None = None  # (key, fbgemm/bf16 state)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: Mode) -> Int8Linear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, mode)
        q, scale = quantize_int8(linear.weight)
        out.qweight.copy_(q)
        out.scale.copy_(scale)
        if linear.bias is not None and out.bias is not None:
            out.bias.copy_(linear.bias.detach().float())
        return out.to(linear.weight.device)

    @classmethod
    def fused(cls, layers: Sequence[Int8Linear]) -> Int8Linear:
        """One layer computing ``layers`` side by side (their outputs concatenated), for
        layers over the same input. Exact: each output channel keeps its int8 row and scale.
        The given layers' buffers become views of the fused ones, so nothing is held twice."""
        first = layers[0]
        if any(m.mode != first.mode or m.in_features != first.in_features for m in layers):
            raise GenloopError("only int8 layers of one mode over the same input fuse")
        with_bias = any(m.bias is not None for m in layers)
        width = sum(m.out_features for m in layers)
        out = cls(first.in_features, width, with_bias, first.mode).to(first.qweight.device)
        out.qweight.copy_(torch.cat([m.qweight for m in layers]))
        out.scale.copy_(torch.cat([m.scale for m in layers]))
        if out.bias is not None:  # zeros stand in for a layer without one
            out.bias.copy_(
                torch.cat(
                    [
                        m.scale.new_zeros(m.out_features) if m.bias is None else m.bias
                        for m in layers
                    ]
                )
            )
        row = 0
        for m in layers:
            rows = slice(row, row + m.out_features)
            m.qweight.data, m.scale.data = out.qweight[rows], out.scale[rows]
            if m.bias is not None and out.bias is not None:
                m.bias.data = out.bias[rows]
            m._packed = None
            row += m.out_features
        return out

    def dequantized(self) -> Tensor:
        """The float weight (N, K) the int8 one stands for."""
        return self.qweight.float() * self.scale.float()[:, None]

    def _state(self, key: tuple[Any, ...], build: Any) -> Any:
        # rebuilt when the weights move or are reloaded (the key holds the data pointer)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, build())
        return self._packed[1]

    def forward(self, x: Tensor) -> Tensor:
        q = self.qweight
        key = (q.device, q.data_ptr(), self.scale.data_ptr())
        if self.mode == "dynamic":
            if q.device.type != "cpu":
                raise GenloopError(
                    "int8 dynamic quantization runs on CPU only (fbgemm); quantize with "
                    "--quantize-mode weight_only for a GPU"
                )
            packed = self._state(key, self._prepack)
            y: Tensor = torch.ops.quantized.linear_dynamic(x.float(), packed, not _cpu_has_vnni())
            return y.to(x.dtype)
        if q.device.type == "cpu":
            scale_bf16 = self._state(key, lambda: self.scale.to(torch.bfloat16))
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(x2, q, scale_bf16)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:  # dequantize on the fly: x·qᵀ·s (per-channel scale commutes with the matmul)
            y = F.linear(x, q.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _prepack(self) -> Any:
        # torch warns that quantized tensors are deprecated; fbgemm's prepack still takes one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            qt = torch._make_per_channel_quantized_tensor(
                self.qweight,
                self.scale.double(),
                torch.zeros(self.out_features, dtype=torch.long),
                0,
            )
            bias = None if self.bias is None else self.bias.float()
            return torch.ops.quantized.linear_prepack(qt, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


# ------------------------------------------------------------------------------ int4


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Groupwise asymmetric int4: ``(packed (N, K/2) uint8, scales_and_zeros (K/G, N, 2))``.

    ``W[n, k] ≈ (q − z₀)·s`` for the group of k, z₀ an integer in [0, 15] (the group's
    range is widened to hold 0, so zero is exact and every weight within half a step),
    kept as ``(q − 8)·s + z``; byte ``j`` of a row holds q of column 2j in its high
    nibble and 2j+1 in its low one (torchao's layout).
    """
    w = weight.detach().float()
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)  # (N, K/G)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    zero_point = torch.round(-lo / scale).clamp(0, 15)  # z₀
    q = torch.round(g / scale[..., None] + zero_point[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(n, k)
    zero = (8.0 - zero_point) * scale
    packed = (q[:, ::2] << 4) | q[:, 1::2]
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return packed.contiguous(), scales_and_zeros


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 → (N, K) int32 codes in [0, 15]."""
    hi, lo = (packed >> 4).to(torch.int32), (packed & 15).to(torch.int32)
    return torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """``y = x·Wᵀ + b`` with W stored as groupwise int4 (two codes per byte)."""

    qweight: Tensor
    scales_and_zeros: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        )
        self.register_buffer(
            "scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2)
        )
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: tuple[tuple[Any, ...], Any] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        packed, sz = quantize_int4(linear.weight, group_size)
        out.qweight.copy_(packed)
        out.scales_and_zeros.copy_(sz)
        if linear.bias is not None and out.bias is not None:
            out.bias.copy_(linear.bias.detach().float())
        return out.to(linear.weight.device)

    def dequantized(self) -> Tensor:
        """The float weight (N, K) the int4 codes stand for."""
        q = unpack_int4(self.qweight).float()  # (N, K)
        n, k, g = self.out_features, self.in_features, self.group_size
        scale = self.scales_and_zeros[..., 0].t().float()  # (N, K/G)
        zero = self.scales_and_zeros[..., 1].t().float()
        w = (q.reshape(n, k // g, g) - 8.0) * scale[..., None] + zero[..., None]
        return w.reshape(n, k)

    def _kernel(self) -> tuple[str, Any]:
        q = self.qweight
        key = (q.device, q.data_ptr(), self.scales_and_zeros.data_ptr())
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, self._pack())
        kind, state = self._packed[1]
        return kind, state

    def _pack(self) -> tuple[str, Any]:
        q, sz = self.qweight, self.scales_and_zeros.to(torch.bfloat16)
        if q.device.type == "cpu" and self.out_features % 16 == 0:  # the kernel's tiling
            codes = unpack_int4(q).contiguous()  # (N, K) int32
            return "cpu", (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2), sz)
        if q.device.type == "cuda" and self.out_features % 8 == 0:
            # tinygemm: K a multiple of inner_k_tiles·16 (not exercised by the CPU test suite)
            for tiles in (8, 4, 2):
                if self.in_features % (tiles * 16) == 0:
                    packed = torch.ops.aten._convert_weight_to_int4pack(q.contiguous(), tiles)
                    return "cuda", (packed, sz)
        return "dequant", None

    def forward(self, x: Tensor) -> Tensor:
        kind, state = self._kernel()
        if kind == "dequant":
            y = F.linear(x, self.dequantized().to(x.dtype))
        else:
            packed, sz = state
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if kind == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
            else:
                y = torch.ops.aten._weight_int4pack_mm(x2, packed, self.group_size, sz)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}"
        )


QUANTIZED_MODULES = (Int8Linear, Int4Linear)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds genloop's quantized linears (they have no ``.weight``)."""
    return any(isinstance(m, QUANTIZED_MODULES) for m in model.modules())


# ------------------------------------------------------------------ saved models


def empty_quantized(model: nn.Module, description: dict[str, Any]) -> None:
    """Swap in empty quantized modules where ``description`` says (weights loaded next)."""
    _check_description(description)
    bits, mode = description["bits"], description["mode"]
    for name in description["modules"]:
        linear = _get_module(model, name)
        if not isinstance(linear, nn.Linear):
            raise GenloopError(f"quantized module {name!r} is not a linear layer of this model")
        new: nn.Module
        if bits == "int8":
            new = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, mode)
        else:
            group = int(description["group_size"])
            new = Int4Linear(
                linear.in_features, linear.out_features, linear.bias is not None, group
            )
        set_module(model, name, new)


def restore(
    model_dir: Path,
    description: dict[str, Any],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Rebuild a quantized model saved by :func:`save_quantized` (eval mode, on ``device``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_description(description)
    if description["mode"] == "dynamic" and torch.device(device).type != "cpu":
        raise GenloopError(
            f"{model_dir} holds int8 dynamic weights, which run on CPU only; load it with "
            "device='cpu' (or quantize with --quantize-mode weight_only for a GPU)"
        )
    weights = model_dir / SAFETENSORS
    if not weights.is_file():
        raise GenloopError(f"{model_dir} has no {SAFETENSORS}")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, attn_implementation="sdpa"
    )
    empty_quantized(model, description)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise GenloopError(
            f"{weights} does not match its quantization description (missing: "
            f"{', '.join(sorted(set(missing) - tied)) or 'none'}; unexpected: "
            f"{', '.join(unexpected) or 'none'})"
        )
    module: nn.Module = model  # nn.Module's typed to/eval (transformers wraps them)
    if dtype is not None:
        module.to(dtype)
    module.to(device)
    module.eval()
    return model


def _check_description(description: dict[str, Any]) -> None:
    if description.get("format") != QUANT_FORMAT:
        raise GenloopError(f"not a {QUANT_FORMAT} description: {description.get('format')!r}")
    if description.get("version") != QUANT_FORMAT_VERSION:
        raise GenloopError(
            f"quantization format version {description.get('version')} is not supported "
            f"(this genloop reads version {QUANT_FORMAT_VERSION})"
        )
    check_scheme(
        str(description.get("bits")),
        str(description.get("mode")),
        int(description.get("group_size") or DEFAULT_GROUP_SIZE),
    )
    modules = description.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise GenloopError("a quantization description needs a list of module names")


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise GenloopError(f"the model has no module {name!r}") from None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` (``a.b.c``) of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
