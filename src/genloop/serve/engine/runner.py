"""The model forward for the engine: prefill one sequence, decode many in one batch.

Two runners share one small interface (:class:`Runner`):

- :class:`LlamaRunner`, the fast path for Llama-style decoders (genloop's own ``causal_lm``
  family): it reads the Hugging Face modules' weights and runs its own forward over a
  preallocated slot cache (``kv_cache.KVCache``). A decode step is one batched pass for
  every running sequence, each at its own position with its own attention mask; a prefill
  step runs one sequence's prompt (a chunk of it when long). The arithmetic is the same as
  transformers' ``LlamaForCausalLM`` (RMSNorm in fp32, the same rotary tables, SDPA), so
  greedy decoding in fp32 gives Hugging Face ``generate``'s tokens (``tests/serve`` checks
  it, alone and inside a busy batch). Per step it launches a few dozen tensor ops instead of
  the HF forward's few hundred, which is what matters for small models on a CPU.
- :class:`HFRunner`, the generic fallback for every other architecture transformers
  builds, causal or encoder-decoder (T5): each sequence keeps its own ``DynamicCache`` and a
  decode step calls the model once per sequence. Correct everywhere, batched nowhere.

Shapes (Llama notation): B sequences, T tokens, d model width, H query heads, K key/value
heads, Q head dim, V vocabulary. Logits come back as fp32 on the CPU-or-GPU device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from genloop.errors import GenloopError
from genloop.serve.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Rope variants whose frequency table does not change with the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class Runner(Protocol):
    """What the engine needs from a model: prefill one sequence, decode a batch."""

    kind: str  # "llama" or "hf"
    n_slots: int
    max_len: int  # longest sequence (prompt + completion) a slot holds
    vocab_size: int
    prefill_chunk: int | None  # longest prefill piece; None: the whole prompt at once

    def prefill(
        self, slot: int, token_ids: Sequence[int], start: int, *, want_logits: bool
    ) -> Tensor | None:
        """Run ``token_ids`` (positions ``start..``) of the sequence in ``slot``; the next-
        token logits (V,) of the last position when ``want_logits``."""
        ...

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> Tensor:
        """One token for each sequence (``token_ids[i]`` at ``positions[i]`` in
        ``slots[i]``); the next-token logits (B, V)."""
        ...

    def move(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's state (its first ``length`` positions) from ``src`` to ``dst``."""
        ...

    def release(self, slot: int) -> None: ...


# ------------------------------------------------------------------------- fast path


@dataclass
class _Layer:
    ln_in: Tensor  # (d,)
    w_qkv: Tensor  # ((H + 2K)·Q, d): q, k and v projections stacked
    b_qkv: Tensor | None
    w_o: Tensor  # (d, H·Q)
    b_o: Tensor | None
    ln_post: Tensor  # (d,)
    w_gate_up: Tensor  # (2I, d): gate and up projections stacked
    b_gate_up: Tensor | None
    w_down: Tensor  # (d, I)
    b_down: Tensor | None


def supports_fast_path(model: Any) -> bool:
    """Whether ``model`` is a Llama decoder :class:`LlamaRunner` computes exactly."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return False
    if type(model).__name__ != "LlamaForCausalLM":
        return False
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("rope_type", "default") in STATIC_ROPE_TYPES


def _stack(linears: Sequence[Any]) -> tuple[Tensor, Tensor | None]:
    """One weight (and bias) for several linears over the same input; the linears' own
    parameters become views of it, so the model (used for beam search) shares the memory."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[row : row + n]
        if bias is not None:
            m.bias.data = bias[row : row + n]
        row += n
    return weight, bias


class LlamaRunner:
    """Batched decode and per-sequence prefill for ``LlamaForCausalLM`` over a slot cache."""

    kind = "llama"

    def __init__(
        self, model: PreTrainedModel, *, n_slots: int, max_len: int, prefill_chunk: int = 512
    ) -> None:
        if not supports_fast_path(model):
            raise GenloopError(f"{type(model).__name__} is not a Llama decoder with static rope")
        config: Any = model.config
        inner: Any = model.model
        self.n_slots = n_slots
        self.max_len = max_len
        self.prefill_chunk: int | None = prefill_chunk
        self.vocab_size = int(config.vocab_size)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(config.num_key_value_heads or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.gqa = self.n_kv_heads != self.n_heads
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

        self.embed: Tensor = inner.embed_tokens.weight.detach()
        self.norm: Tensor = inner.norm.weight.detach()
        self.lm_head: Tensor = model.lm_head.weight.detach()
        self.act: Callable[[Tensor], Tensor] = inner.layers[0].mlp.act_fn
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            w_qkv, b_qkv = _stack([attn.q_proj, attn.k_proj, attn.v_proj])
            w_gu, b_gu = _stack([mlp.gate_proj, mlp.up_proj])
            self.layers.append(
                _Layer(
                    ln_in=layer.input_layernorm.weight.detach(),
                    w_qkv=w_qkv,
                    b_qkv=b_qkv,
                    w_o=attn.o_proj.weight.detach(),
                    b_o=None if attn.o_proj.bias is None else attn.o_proj.bias.detach(),
                    ln_post=layer.post_attention_layernorm.weight.detach(),
                    w_gate_up=w_gu,
                    b_gate_up=b_gu,
                    w_down=mlp.down_proj.weight.detach(),
                    b_down=None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach(),
                )
            )
        # The rotary tables for every position, computed as LlamaRotaryEmbedding does:
        # fp32 position × inv_freq, duplicated, cos/sin times the attention scaling.
        rotary = inner.rotary_emb
        positions = torch.arange(max_len, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(self.device, torch.float32)  # (T, Q/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, Q)
        self.cos = (emb.cos() * rotary.attention_scaling).to(self.dtype)
        self.sin = (emb.sin() * rotary.attention_scaling).to(self.dtype)
        self.cache = KVCache(
            n_layers=len(self.layers),
            n_slots=n_slots,
            n_kv_heads=self.n_kv_heads,
            max_len=max_len,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self._positions = torch.arange(max_len, device=self.device)

    # ---------------------------------------------------------------- building blocks

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        # LlamaRMSNorm, step for step: fp32 statistics, then the weight in the input dtype.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos) + (rotated * sin)

    def _mlp(self, x: Tensor, layer: _Layer) -> Tensor:
        gate, up = F.linear(x, layer.w_gate_up, layer.b_gate_up).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, layer.w_down, layer.b_down)

    def _logits(self, x: Tensor) -> Tensor:
        return F.linear(self._rms(x, self.norm), self.lm_head).float()

    # ---------------------------------------------------------------------- prefill

    @torch.inference_mode()
    def prefill(
        self, slot: int, token_ids: Sequence[int], start: int, *, want_logits: bool
    ) -> Tensor | None:
        t = len(token_ids)
        end = start + t
        if t == 0 or end > self.max_len:
            raise GenloopError(f"prefill of positions {start}..{end} past {self.max_len}")
        h_, k_, q_ = self.n_heads, self.n_kv_heads, self.head_dim
        ids = torch.tensor([list(token_ids)], device=self.device)  # (1, T)
        x = F.embedding(ids, self.embed)  # (1, T, d)
        cos, sin = self.cos[start:end], self.sin[start:end]  # (T, Q), broadcast over heads
        mask = None
        if start > 0:  # a later chunk: attend to the cached prefix and causally to itself
            mask = self._positions[:end][None, :] <= self._positions[start:end][:, None]
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.ln_in)
            qkv = F.linear(h, layer.w_qkv, layer.b_qkv)  # (1, T, (H + 2K)·Q)
            q = qkv[..., : h_ * q_].view(1, t, h_, q_).transpose(1, 2)  # (1, H, T, Q)
            k = qkv[..., h_ * q_ : (h_ + k_) * q_].view(1, t, k_, q_).transpose(1, 2)
            v = qkv[..., (h_ + k_) * q_ :].view(1, t, k_, q_).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.cache.k[i, slot, :, start:end] = k[0]
            self.cache.v[i, slot, :, start:end] = v[0]
            if mask is None:
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.gqa
                )
            else:
                keys = self.cache.k[i, slot : slot + 1, :, :end]  # (1, K, end, Q)
                values = self.cache.v[i, slot : slot + 1, :, :end]
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.gqa
                )
            out = out.transpose(1, 2).reshape(1, t, h_ * q_)
            x = x + F.linear(out, layer.w_o, layer.b_o)
            x = x + self._mlp(self._rms(x, layer.ln_post), layer)
        if not want_logits:
            return None
        return self._logits(x[0, -1:])[0]  # (V,): only the last position, as generate does

    # ----------------------------------------------------------------------- decode

    @torch.inference_mode()
    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> Tensor:
        b = len(slots)
        h_, k_, q_ = self.n_heads, self.n_kv_heads, self.head_dim
        longest = max(positions) + 1
        if longest > self.max_len:
            raise GenloopError(f"decode at position {longest - 1} past {self.max_len}")
        compact = all(s == i for i, s in enumerate(slots))  # slots 0..B-1: read views
        index = torch.tensor(list(slots), device=self.device)  # (B,)
        pos = torch.tensor(list(positions), device=self.device)  # (B,)
        # rows of the (S·K·T, Q) view of a layer's cache that the new keys go to: one
        # index_copy_ per layer is several times faster than k[slots, :, pos] = ...
        heads = torch.arange(k_, device=self.device)
        rows = ((index[:, None] * k_ + heads[None, :]) * self.max_len + pos[:, None]).reshape(-1)
        n_rows = self.n_slots * k_ * self.max_len
        x = F.embedding(torch.tensor(list(token_ids), device=self.device), self.embed)  # (B, d)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, Q)
        # (B, 1, 1, T): each sequence sees its own positions 0..pos; none when all equal
        mask = None
        if b > 1:
            mask = (self._positions[:longest][None, :] <= pos[:, None])[:, None, None, :]
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.ln_in)
            qkv = F.linear(h, layer.w_qkv, layer.b_qkv)  # (B, (H + 2K)·Q)
            q = self._rope(qkv[:, : h_ * q_].view(b, h_, q_), cos, sin)  # (B, H, Q)
            k = self._rope(qkv[:, h_ * q_ : (h_ + k_) * q_].view(b, k_, q_), cos, sin)
            v = qkv[:, (h_ + k_) * q_ :].view(b, k_, q_)
            layer_k, layer_v = self.cache.k[i], self.cache.v[i]  # (S, K, T, Q)
            layer_k.view(n_rows, q_).index_copy_(0, rows, k.reshape(b * k_, q_))
            layer_v.view(n_rows, q_).index_copy_(0, rows, v.reshape(b * k_, q_))
            if compact:
                keys, values = layer_k[:b, :, :longest], layer_v[:b, :, :longest]
            else:
                keys = layer_k[:, :, :longest].index_select(0, index)
                values = layer_v[:, :, :longest].index_select(0, index)
            out = F.scaled_dot_product_attention(
                q[:, :, None], keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.gqa
            )  # (B, H, 1, Q)
            x = x + F.linear(out.reshape(b, h_ * q_), layer.w_o, layer.b_o)
            x = x + self._mlp(self._rms(x, layer.ln_post), layer)
        return self._logits(x)  # (B, V)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def release(self, slot: int) -> None:
        pass  # positions past a sequence's end are masked; nothing to clear


# ---------------------------------------------------------------------- fallback


class HFRunner:
    """Any transformers language model, one forward per sequence (``DynamicCache`` each).

    Encoder-decoder models (T5) run their encoder on the whole prompt at prefill, then
    decode from the decoder start token, as ``generate`` does.
    """

    kind = "hf"

    def __init__(self, model: PreTrainedModel, *, n_slots: int, max_len: int) -> None:
        self.model: Any = model
        self.n_slots = n_slots
        self.max_len = max_len
        config: Any = model.config
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        # an encoder-decoder prompt is encoded in one piece; a decoder's may be chunked
        self.prefill_chunk: int | None = None if self.encoder_decoder else 512
        self.vocab_size = int(config.vocab_size)
        self.device = next(model.parameters()).device
        start = getattr(model.generation_config, "decoder_start_token_id", None)
        start = start if start is not None else getattr(config, "decoder_start_token_id", None)
        if self.encoder_decoder and start is None:
            raise GenloopError("this encoder-decoder model has no decoder_start_token_id")
        self.decoder_start = start
        self.caches: list[Any] = [None] * n_slots
        self.encoded: list[Any] = [None] * n_slots

    @torch.inference_mode()
    def prefill(
        self, slot: int, token_ids: Sequence[int], start: int, *, want_logits: bool
    ) -> Tensor | None:
        from transformers import DynamicCache, EncoderDecoderCache

        ids = torch.tensor([list(token_ids)], device=self.device)
        if self.encoder_decoder:
            encoded = self.model.get_encoder()(input_ids=ids)
            cache: Any = EncoderDecoderCache(DynamicCache(), DynamicCache())
            first = torch.tensor([[self.decoder_start]], device=self.device)
            out = self.model(
                encoder_outputs=encoded, decoder_input_ids=first, past_key_values=cache
            )
            self.encoded[slot] = encoded
        else:
            cache = DynamicCache() if start == 0 else self.caches[slot]
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        self.caches[slot] = out.past_key_values
        return out.logits[0, -1].float() if want_logits else None

    @torch.inference_mode()
    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> Tensor:
        rows = []
        for slot, token in zip(slots, token_ids, strict=True):
            ids = torch.tensor([[token]], device=self.device)
            if self.encoder_decoder:
                out = self.model(
                    encoder_outputs=self.encoded[slot],
                    decoder_input_ids=ids,
                    past_key_values=self.caches[slot],
                )
            else:
                out = self.model(input_ids=ids, past_key_values=self.caches[slot], use_cache=True)
            self.caches[slot] = out.past_key_values
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def move(self, src: int, dst: int, length: int) -> None:
        if src == dst:
            return
        self.caches[dst], self.caches[src] = self.caches[src], None
        self.encoded[dst], self.encoded[src] = self.encoded[src], None

    def release(self, slot: int) -> None:
        self.caches[slot] = None
        self.encoded[slot] = None


def build_runner(
    model: PreTrainedModel, *, n_slots: int, max_len: int, kind: str = "auto"
) -> LlamaRunner | HFRunner:
    """The fast runner when the architecture allows it (``kind="auto"``), else the fallback."""
    if kind not in ("auto", "llama", "hf"):
        raise GenloopError(f"unknown runner {kind!r} (runners: auto, llama, hf)")
    if kind == "llama" or (kind == "auto" and supports_fast_path(model)):
        return LlamaRunner(model, n_slots=n_slots, max_len=max_len)
    return HFRunner(model, n_slots=n_slots, max_len=max_len)
