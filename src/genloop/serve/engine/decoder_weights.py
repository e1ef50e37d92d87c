"""Every batched family's weights in one shape: what ``runner.DecoderRunner`` computes over.

The decoders the native engine batches (``architectures.BATCHED_MODEL_TYPES``) differ in a
handful of places only: which norms sit where (and how they round), how q/k/v come out of
the projections, the rotary tables, positions, the MLP's gate, the residual wiring, and
soft-capping. :class:`DecoderWeights` names those choices; one adapter per family reads a
transformers model's modules into it (:func:`read_decoder`), so the runner has one forward
and no family names in it.

The adapters take the modules' own tensors (no copies: fused projections become the
backing store of the model's layers, see :func:`fuse`), their own activation functions
and rotary frequencies, so the runner's arithmetic is the model's.

Shapes (Llama notation): d model width, H query heads, K key/value heads, Q head dim,
V vocabulary, I the MLP's intermediate width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from genloop.errors import GenloopError
from genloop.serve.engine.architectures import (
    CAUSAL_LM_CLASSES,
    layer_windows,
    unsupported_reason,
)

Proj = Callable[[Tensor], Tensor]  # a projection: (N, in) → (N, out)

# How a norm rounds (they agree in fp32):
# - "rms": statistics in fp32, cast back, then times the weight (Llama's RMSNorm);
# - "rms_fp32": statistics and the weight product in fp32, then cast (OLMo 2; Gemma's
#   ``(1 + w)`` RMSNorm, whose weight the adapter stores as ``1 + w`` in fp32);
# - "layer": LayerNorm with its bias (GPT-2, GPT-NeoX).
NormKind = Literal["rms", "rms_fp32", "layer"]


@dataclass(frozen=True)
class Norm:
    kind: NormKind
    weight: Tensor  # (width,) or, for per-head q/k norms stacked, (heads, Q)
    eps: float
    bias: Tensor | None = None


@dataclass(kw_only=True)
class DecoderLayer:
    """One decoder layer. Norms that a family lacks are None."""

    attn_norm: Norm | None  # before attention (every family but OLMo 2)
    qkv: Proj  # d → (H + 2K)·Q: q, k, v side by side (GPT-NeoX: per head, see below)
    q_norm: Norm | None = None  # on the queries: per head (Qwen 3, Gemma 3) or the whole (OLMo 2)
    k_norm: Norm | None = None
    o: Proj  # H·Q → d
    attn_out_norm: Norm | None = None  # on the attention output (Gemma 2/3, OLMo 2)
    mlp_norm: Norm | None  # before the MLP
    up: Proj  # d → 2I (gate and up side by side) or d → I (no gate)
    down: Proj  # I → d
    mlp_out_norm: Norm | None = None  # on the MLP output (Gemma 2/3, OLMo 2)
    scale: float  # attention logits' scale
    window: int | None = None  # sliding attention window, None: every position
    rope: int = 0  # which rotary table (Gemma 3: local and global)


@dataclass(kw_only=True)
class DecoderWeights:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    embed: Tensor  # (V, d)
    embed_scale: Tensor | None = None  # Gemma: x · √d, the scale in the weights' dtype
    positions: Tensor | None = None  # learned absolute positions (GPT-2), (P, d)
    layers: list[DecoderLayer]
    final_norm: Norm
    lm_head: Proj  # d → V
    act: Callable[[Tensor], Tensor]
    gated: bool  # MLP: down(act(gate) · up); else down(act(up))
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    qkv_per_head: bool = False  # GPT-NeoX: the projection is (H, 3, Q): each head's q, k, v
    qk_norm_per_head: bool = False
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention logits
    final_softcap: float | None = None  # Gemma 2/3: of the output logits
    # (inv_freq (R/2,), attention scaling) per rotary table; none: learned positions
    rotary: list[tuple[Tensor, float]] = field(default_factory=list)
    rotary_fp32: bool = False  # OLMo 2: q, k roped in fp32 (its tables stay fp32), then cast


def is_int8(module: Any) -> bool:
    from genloop.models.quantized import Int8Linear

    return isinstance(module, Int8Linear)


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's linear: weight stored (in, out)


def supports_model(model: Any, max_len: int | None = None) -> bool:
    """Whether :func:`read_decoder` takes ``model`` and the runner computes it exactly, for
    sequences up to ``max_len``: a batched architecture (``architectures.supports_batching``)
    built by its causal LM class, its linear layers plain float ones, or int8 (``genloop
    optimize --quantize int8``; other replacements, such as int4, run through the model's
    own forward)."""
    config = getattr(model, "config", None)
    if config is None or unsupported_reason(config, max_len=max_len) is not None:
        return False
    if type(model).__name__ != CAUSAL_LM_CLASSES.get(config.model_type):
        return False
    for module in model.modules():
        name = type(module).__name__
        linear = "Linear" in name or name == "Conv1D" or isinstance(module, torch.nn.Linear)
        computed = type(module) is torch.nn.Linear or is_int8(module) or _is_conv1d(module)
        if linear and not computed:
            return False
    return True


# ------------------------------------------------------------------------ projections


def fuse(linears: Sequence[Any]) -> Proj:
    """One projection for linears over the same input, their outputs side by side.

    Float linears: one (in, out) weight (x @ w is one plain matmul, which MKL runs 10-20%
    faster than x @ wᵀ for the wide ones). Int8 linears: one ``Int8Linear`` with their rows
    and scales stacked (exact). GPT-2's ``Conv1D`` already holds its weight as (in, out).
    Either way the layers' own tensors become views of the fused ones, so the model, still
    used for beam search, shares the memory.
    """
    if all(is_int8(m) for m in linears):
        from genloop.models.quantized import Int8Linear

        fused: Proj = linears[0] if len(linears) == 1 else Int8Linear.fused(linears)
        return fused
    if len(linears) == 1 and _is_conv1d(linears[0]):
        weight, bias = linears[0].weight.detach(), linears[0].bias.detach()
        return lambda x: _linear(x, weight, bias)
    if not all(type(m) is torch.nn.Linear for m in linears):
        raise GenloopError("a fused projection needs all float or all int8 linears")
    weight, stacked = _stack(linears)
    return lambda x: _linear(x, weight, stacked)


def _stack(linears: Sequence[Any]) -> tuple[Tensor, Tensor | None]:
    """One (in, out) weight (and bias) for linears over the same input, their outputs side
    by side. The linears' own parameters become views of it (``weight = w[:, cols].T``);
    zeros stand in for the bias of a linear without one (Qwen 2's q/k/v have one, not all
    families' do), which adds exactly nothing."""
    weight = torch.cat([m.weight.detach() for m in linears]).t().contiguous()
    if any(m.bias is not None for m in linears):
        bias: Tensor | None = torch.cat(
            [
                m.weight.new_zeros(m.weight.shape[0]) if m.bias is None else m.bias.detach()
                for m in linears
            ]
        )
    else:
        bias = None
    col = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[:, col : col + n].t()
        if bias is not None and m.bias is not None:
            m.bias.data = bias[col : col + n]
        col += n
    return weight, bias


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight (+ bias) for a 2-D x and an (in, out) weight."""
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


# ------------------------------------------------------------------------------ norms


def _rms(module: Any, eps: float | None = None) -> Norm:
    return Norm("rms", module.weight.detach(), _eps(module, eps))


def _rms_fp32(module: Any) -> Norm:
    return Norm("rms_fp32", module.weight.detach(), _eps(module))


def _gemma_rms(module: Any) -> Norm:
    # output · (1 + w) in fp32: the sum computed once here, the same values every call
    return Norm("rms_fp32", 1.0 + module.weight.detach().float(), _eps(module))


def _layer_norm(module: Any) -> Norm:
    bias = module.bias.detach() if module.bias is not None else None
    return Norm("layer", module.weight.detach(), float(module.eps), bias)


def _eps(module: Any, eps: float | None = None) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    if eps is None:
        raise GenloopError(f"{type(module).__name__} has no epsilon")
    return eps


def _stacked(q: Norm, k: Norm, n_heads: int, n_kv_heads: int) -> tuple[Norm, Norm]:
    """Per-head q and k norms, their (Q,) weights repeated over the heads, so that q and k
    (adjacent in the projection) are normed in one op: (H + K, Q)."""
    weight = torch.cat([q.weight.expand(n_heads, -1), k.weight.expand(n_kv_heads, -1)])
    both = Norm(q.kind, weight, q.eps)
    return both, both


# --------------------------------------------------------------------------- adapters


def read_decoder(model: Any, max_len: int | None = None) -> DecoderWeights:
    """The weights of a batched-architecture causal LM (see :func:`supports_model`)."""
    if not supports_model(model, max_len):
        found = getattr(model, "config", None)
        reason = unsupported_reason(found, max_len=max_len) if found is not None else None
        raise GenloopError(
            f"{type(model).__name__} does not run on the native batched runner"
            + (f": {reason}" if reason else "")
        )
    config: Any = model.config
    model_type = config.model_type
    if model_type == "gpt2":
        return _read_gpt2(model)
    if model_type == "gpt_neox":
        return _read_gpt_neox(model)
    return _read_llama_like(model)


def _head(model: Any, embed: Tensor) -> tuple[Proj, Tensor]:
    """The output head as (d, V), and the embedding table. With tied embeddings the table
    becomes the head's transposed view (a row lookup reads it just as well), so nothing is
    held twice; a quantized head leaves the float table alone."""
    head = model.get_output_embeddings()
    if is_int8(head):
        return fuse([head]), embed.detach()
    tied = embed is head.weight or embed.data_ptr() == head.weight.data_ptr()
    proj = fuse([head])
    if tied:
        embed.data = head.weight.data
    return proj, embed.detach()


def _rotary(module: Any, layer_type: str | None = None) -> tuple[Tensor, float]:
    """A rotary embedding's frequencies and scaling. The *original* frequencies: a longrope
    module overwrites ``inv_freq`` with its long table after a long forward, and the
    runner takes longrope only where the original (short) one applies."""
    prefix = "" if layer_type is None else f"{layer_type}_"
    inv_freq = getattr(module, f"{prefix}original_inv_freq", None)
    if inv_freq is None:
        inv_freq = getattr(module, f"{prefix}inv_freq")
    return inv_freq.detach(), float(getattr(module, f"{prefix}attention_scaling"))


def _read_llama_like(model: Any) -> DecoderWeights:
    """Llama, Mistral, Qwen 2/3, Gemma 2/3, Phi-3, OLMo 2: ``model.model.layers[i]`` with
    ``self_attn`` and ``mlp``; the families differ in norms and fused projections."""
    config: Any = model.config
    model_type = config.model_type
    inner: Any = model.model
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    gemma = model_type in ("gemma2", "gemma3_text")
    olmo = model_type == "olmo2"
    norm: Callable[[Any], Norm] = _gemma_rms if gemma else _rms_fp32 if olmo else _rms
    windows = layer_windows(config)
    types: list[str] = list(getattr(config, "layer_types", None) or [])
    rotary_types: list[str | None] = [None]
    if model_type == "gemma3_text":  # a table per layer type: local and global
        rotary_types = list(sorted(set(types)))
    rotary = [_rotary(inner.rotary_emb, t) for t in rotary_types]
    lm_head, embed = _head(model, inner.embed_tokens.weight)
    first_mlp = inner.layers[0].mlp
    layers = []
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if model_type == "phi3":
            qkv, up = fuse([attn.qkv_proj]), fuse([mlp.gate_up_proj])
        else:
            qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            up = fuse([mlp.gate_proj, mlp.up_proj])
        q_norm = k_norm = None
        if hasattr(attn, "q_norm"):
            q_norm, k_norm = norm(attn.q_norm), norm(attn.k_norm)
            if not olmo:  # per head (OLMo 2's cover the whole projection)
                q_norm, k_norm = _stacked(q_norm, k_norm, n_heads, n_kv)
        layers.append(
            DecoderLayer(
                attn_norm=None if olmo else norm(layer.input_layernorm),
                qkv=qkv,
                q_norm=q_norm,
                k_norm=k_norm,
                o=fuse([attn.o_proj]),
                attn_out_norm=norm(layer.post_attention_layernorm) if gemma or olmo else None,
                mlp_norm=(
                    norm(layer.pre_feedforward_layernorm)
                    if gemma
                    else None
                    if olmo
                    else norm(layer.post_attention_layernorm)
                ),
                up=up,
                down=fuse([mlp.down_proj]),
                mlp_out_norm=norm(layer.post_feedforward_layernorm) if gemma or olmo else None,
                scale=float(attn.scaling),
                window=windows[i],
                rope=rotary_types.index(types[i]) if model_type == "gemma3_text" else 0,
            )
        )
    embed_scale = None
    if gemma:  # Gemma's scaled embedding: x · √d, the scale rounded to the weights' dtype
        embed_scale = inner.embed_tokens.embed_scale.to(embed.device, embed.dtype)
    return DecoderWeights(
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        embed=embed,
        embed_scale=embed_scale,
        layers=layers,
        final_norm=norm(inner.norm),
        lm_head=lm_head,
        act=getattr(first_mlp, "act_fn", None) or first_mlp.activation_fn,
        gated=True,
        qk_norm_per_head=not olmo,
        attn_softcap=getattr(config, "attn_logit_softcapping", None)
        if model_type == "gemma2"  # Gemma 3's forward does not apply it
        else None,
        final_softcap=getattr(config, "final_logit_softcapping", None) if gemma else None,
        rotary=rotary,
        rotary_fp32=olmo,
    )


def _read_gpt2(model: Any) -> DecoderWeights:
    """GPT-2: LayerNorms with bias, one ``Conv1D`` for q/k/v, learned positions, a plain
    MLP; per-layer attention scale (``scale_attn_by_inverse_layer_idx``)."""
    config: Any = model.config
    inner: Any = model.transformer
    n_heads = int(config.num_attention_heads)
    lm_head, embed = _head(model, inner.wte.weight)
    layers = [
        DecoderLayer(
            attn_norm=_layer_norm(block.ln_1),
            qkv=fuse([block.attn.c_attn]),
            o=fuse([block.attn.c_proj]),
            mlp_norm=_layer_norm(block.ln_2),
            up=fuse([block.mlp.c_fc]),
            down=fuse([block.mlp.c_proj]),
            scale=float(block.attn.scaling),
        )
        for block in inner.h
    ]
    return DecoderWeights(
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=int(config.hidden_size) // n_heads,
        embed=embed,
        positions=inner.wpe.weight.detach(),
        layers=layers,
        final_norm=_layer_norm(inner.ln_f),
        lm_head=lm_head,
        act=inner.h[0].mlp.act,
        gated=False,
    )


def _read_gpt_neox(model: Any) -> DecoderWeights:
    """GPT-NeoX: LayerNorms with bias, q/k/v interleaved per head, partial rotary
    (``rotary_pct``), a plain MLP, parallel residual (``use_parallel_residual``)."""
    config: Any = model.config
    inner: Any = model.gpt_neox
    n_heads = int(config.num_attention_heads)
    lm_head, embed = _head(model, inner.embed_in.weight)
    layers = [
        DecoderLayer(
            attn_norm=_layer_norm(layer.input_layernorm),
            qkv=fuse([layer.attention.query_key_value]),
            o=fuse([layer.attention.dense]),
            mlp_norm=_layer_norm(layer.post_attention_layernorm),
            up=fuse([layer.mlp.dense_h_to_4h]),
            down=fuse([layer.mlp.dense_4h_to_h]),
            scale=float(layer.attention.scaling),
        )
        for layer in inner.layers
    ]
    return DecoderWeights(
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=int(config.hidden_size) // n_heads,
        embed=embed,
        layers=layers,
        final_norm=_layer_norm(inner.final_layer_norm),
        lm_head=lm_head,
        act=inner.layers[0].mlp.act,
        gated=False,
        parallel_residual=bool(config.use_parallel_residual),
        qkv_per_head=True,
        rotary=[_rotary(inner.rotary_emb)],
    )
