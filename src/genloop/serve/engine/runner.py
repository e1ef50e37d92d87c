"""The model forward for the engine: one step = prefill chunks + a decode batch.

Two PyTorch runners share one small interface (:class:`Runner`, whose ``step`` takes the
prompt chunks to prefill and the sequences to decode one token each, and returns their
logits):

- :class:`LlamaRunner`, the fast path for Llama-style decoders (genloop's own ``causal_lm``
  family): it reads the Hugging Face modules' weights and runs its own forward over a
  preallocated slot cache (``kv_cache.KVCache``). A step is one forward over every token
  of the step: the projections and MLPs see them all at once, the decode rows attend
  (batched, each at its own position with its own mask) to their slots, each prompt chunk
  attends causally to itself and its cached prefix. The arithmetic is the same as
  transformers' ``LlamaForCausalLM`` (RMSNorm in fp32, the same rotary tables, SDPA), so
  greedy decoding in fp32 gives Hugging Face ``generate``'s tokens (``tests/serve`` checks
  it, alone and inside a busy batch). Per step it launches a few dozen tensor ops per layer
  instead of the HF forward's hundreds, which is what matters for small models on a CPU.
  int8 variants (``genloop optimize --quantize int8``) take it too, their q/k/v and
  gate/up int8 layers fused the same way (exactly: each output channel keeps its own row
  and scale). With int8 *dynamic* the activations are quantized per call over the whole
  step, so a sequence's rounding may depend on what shares its batch; weight-only int8
  does not.
- :class:`HFRunner`, the generic fallback for every other architecture transformers
  builds (and int4 variants), causal or encoder-decoder (T5): each sequence keeps its own
  ``DynamicCache`` and a step calls the model once per sequence. Correct everywhere,
  batched nowhere.

A third, ``onnx_runner.OnnxRunner``, runs an ONNX variant in onnxruntime over the same
interface.

Shapes (Llama notation): B sequences, N tokens in a step, T positions, d model width,
H query heads, K key/value heads, Q head dim, V vocabulary. Logits are fp32.
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


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of one sequence to prefill: positions ``start..start+len(token_ids)``."""

    slot: int
    token_ids: Sequence[int]
    start: int
    want_logits: bool  # the last chunk of a prompt: its next-token logits are wanted


class Runner(Protocol):
    """What the engine needs from a model: one forward per step over a mixed batch."""

    kind: str  # "llama", "hf" or "onnx"
    n_slots: int
    max_len: int  # longest sequence (prompt + completion) a slot holds
    vocab_size: int
    prefill_chunk: int | None  # longest prefill piece; None: the whole prompt at once

    def step(
        self,
        chunks: Sequence[Chunk],
        slots: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
    ) -> Tensor | None:
        """Prefill ``chunks`` and decode one token for each sequence (``token_ids[i]`` at
        ``positions[i]`` in ``slots[i]``). Returns next-token logits, fp32: one row per
        decoded sequence, then one per chunk that wants logits (None when no row)."""
        ...

    def move(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's state (its first ``length`` positions) from ``src`` to ``dst``."""
        ...

    def release(self, slot: int) -> None: ...


# ------------------------------------------------------------------------- fast path


Proj = Callable[[Tensor], Tensor]  # a projection: (N, in) → (N, out)


@dataclass
class _Layer:
    """One decoder layer: its norms' weights and its projections, fused where they share
    an input (see :func:`_fuse`)."""

    ln_in: Tensor  # (d,)
    qkv: Proj  # d → (H + 2K)·Q: q, k and v projections side by side
    o: Proj  # H·Q → d
    ln_post: Tensor  # (d,)
    gate_up: Proj  # d → 2I: gate and up projections side by side
    down: Proj  # I → d


def _is_int8(module: Any) -> bool:
    from genloop.models.quantized import Int8Linear

    return isinstance(module, Int8Linear)


def supports_fast_path(model: Any) -> bool:
    """Whether ``model`` is a Llama decoder :class:`LlamaRunner` computes exactly: its
    linear layers plain float ones, or all int8 (``genloop optimize --quantize int8``)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return False
    if type(model).__name__ != "LlamaForCausalLM":
        return False
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
        return False
    # plain float linears, or int8 ones (every layer); another replacement (int4) runs
    # through the model's own forward instead
    linears = [
        m for m in model.modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__
    ]
    return all(type(m) is torch.nn.Linear for m in linears) or all(
        type(m) is torch.nn.Linear or _is_int8(m) for m in linears
    )


def _fuse(linears: Sequence[Any]) -> Proj:
    """One projection for linears over the same input, their outputs side by side.

    Float linears: one (in, out) weight (x @ w is one plain matmul, which MKL runs 10-20%
    faster than x @ wᵀ for the wide ones). Int8 linears: one ``Int8Linear`` with their rows
    and scales stacked (exact). Either way the layers' own tensors become views of the
    fused ones, so the model, still used for beam search, shares the memory.
    """
    if all(_is_int8(m) for m in linears):
        from genloop.models.quantized import Int8Linear

        fused: Proj = Int8Linear.fused(linears)
        return fused
    if not all(type(m) is torch.nn.Linear for m in linears):
        raise GenloopError("a fused projection needs all float or all int8 linears")
    weight, bias = _stack(linears)
    return lambda x: _linear(x, weight, bias)


def _stack(linears: Sequence[Any]) -> tuple[Tensor, Tensor | None]:
    """One (in, out) weight (and bias) for linears over the same input, their outputs side
    by side. The linears' own parameters become views of it (``weight = w[:, cols].T``)."""
    weight = torch.cat([m.weight.detach() for m in linears]).t().contiguous()
    biases = [m.bias for m in linears]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    col = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[:, col : col + n].t()
        if bias is not None:
            m.bias.data = bias[col : col + n]
        col += n
    return weight, bias


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight (+ bias) for a 2-D x and an (in, out) weight."""
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


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
        first = inner.embed_tokens.weight  # float in every variant (int8 keeps it)
        self.device, self.dtype = first.device, first.dtype

        embed = inner.embed_tokens.weight
        if _is_int8(model.lm_head):  # a quantized head: the embedding table stays float
            self.lm_head: Proj = _fuse([model.lm_head])
        else:
            head = model.lm_head.weight
            tied = embed is head or embed.data_ptr() == head.data_ptr()
            # the head as (d, V); with tied embeddings the table itself becomes its
            # transposed view (a row lookup reads it just as well), so nothing is held twice
            self.lm_head = _fuse([model.lm_head])
            if tied:
                embed.data = head.data
        self.embed: Tensor = embed.detach()  # (V, d), maybe a view of the head
        self.norm: Tensor = inner.norm.weight.detach()
        self.act: Callable[[Tensor], Tensor] = inner.layers[0].mlp.act_fn
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    ln_in=layer.input_layernorm.weight.detach(),
                    qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]),
                    o=_fuse([attn.o_proj]),
                    ln_post=layer.post_attention_layernorm.weight.detach(),
                    gate_up=_fuse([mlp.gate_proj, mlp.up_proj]),
                    down=_fuse([mlp.down_proj]),
                )
            )
        # The rotary tables for every position, computed as LlamaRotaryEmbedding does:
        # fp32 position × inv_freq, duplicated, cos/sin times the attention scaling.
        rotary = inner.rotary_emb
        positions = torch.arange(max_len, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(self.device, torch.float32)  # (T, Q/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, Q)
        self.cos = (emb.cos() * rotary.attention_scaling).to(self.dtype)
        sin = (emb.sin() * rotary.attention_scaling).to(self.dtype)
        half = self.head_dim // 2
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # signed, see _rope
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
        if x.dtype == torch.float32:  # one fused op, bit for bit LlamaRMSNorm's result
            return F.rms_norm(x, weight.shape, weight, self.eps)
        # LlamaRMSNorm, step for step: fp32 statistics, then the weight in the input dtype.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # x·cos + rotate_half(x)·sin, where rotate_half(x) = (-x2, x1): rolling x by half the
        # head dim gives (x2, x1), and the sign lives in the sin table (-sin, sin). Negation
        # is exact, so the values are those of apply_rotary_pos_emb, in 4 ops instead of 7.
        return (x * cos) + (x.roll(self.head_dim // 2, dims=-1) * sin)

    def _mlp(self, x: Tensor, layer: _Layer) -> Tensor:
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        return layer.down(self.act(gate) * up)

    def _logits(self, x: Tensor) -> Tensor:
        return self.lm_head(self._rms(x, self.norm)).float()

    # ------------------------------------------------------------------------- step

    @torch.inference_mode()
    def step(
        self,
        chunks: Sequence[Chunk],
        slots: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
    ) -> Tensor | None:
        """One forward over a flat batch of N tokens: B decode tokens, then every chunk's.

        The projections and the MLP see all N tokens at once (one matrix multiply each);
        only attention differs: the decode rows attend, batched, to their slots' cache
        (B, H, 1, T) with a per-row mask; each chunk attends causally to itself (a first
        chunk, exactly as the Hugging Face forward does) or to its cached prefix.
        """
        b = len(slots)
        h_, k_, q_ = self.n_heads, self.n_kv_heads, self.head_dim
        dev = self.device
        all_tokens = list(token_ids)
        all_pos = list(positions)
        all_slots = list(slots)
        spans = []  # (offset in the flat batch, chunk)
        for chunk in chunks:
            t = len(chunk.token_ids)
            if t == 0 or chunk.start + t > self.max_len:
                raise GenloopError(
                    f"prefill of positions {chunk.start}..{chunk.start + t} past {self.max_len}"
                )
            spans.append((len(all_tokens), chunk))
            all_tokens.extend(chunk.token_ids)
            all_pos.extend(range(chunk.start, chunk.start + t))
            all_slots.extend([chunk.slot] * t)
        n = len(all_tokens)
        if n == 0:
            return None
        if b and max(positions) >= self.max_len:
            raise GenloopError(f"decode at position {max(positions)} past {self.max_len}")
        pos = torch.tensor(all_pos, device=dev)  # (N,)
        slot_t = torch.tensor(all_slots, device=dev)  # (N,)
        # rows of the (S·K·T, Q) view of a layer's cache that each token's keys go to: one
        # index_copy_ per layer is several times faster than k[slots, :, pos] = ...
        heads = torch.arange(k_, device=dev)
        rows = ((slot_t[:, None] * k_ + heads[None, :]) * self.max_len + pos[:, None]).reshape(-1)
        n_rows = self.n_slots * k_ * self.max_len
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (N, 1, Q)
        x = F.embedding(torch.tensor(all_tokens, device=dev), self.embed)  # (N, d)
        qk = h_ + k_  # q and k heads, adjacent in the qkv projection: roped together

        longest = max(positions) + 1 if b else 0
        compact = all(s == i for i, s in enumerate(slots))  # slots 0..B-1: read views
        index = slot_t[:b]
        mask = None  # (B, 1, 1, T), additive: each row sees its own positions 0..pos
        if b > 1:
            later = self._positions[:longest][None, :] > pos[:b, None]
            mask = torch.zeros(later.shape, dtype=self.dtype, device=dev)
            mask = mask.masked_fill_(later, float("-inf"))[:, None, None, :]
        chunk_masks = [
            None
            if c.start == 0
            else self._positions[: c.start + len(c.token_ids)][None, :]
            <= self._positions[c.start : c.start + len(c.token_ids)][:, None]
            for _, c in spans
        ]
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.ln_in)
            qkv = layer.qkv(h)  # (N, (H + 2K)·Q)
            roped = self._rope(qkv[:, : qk * q_].view(n, qk, q_), cos, sin)  # (N, H + K, Q)
            q, k = roped[:, :h_], roped[:, h_:]  # (N, H, Q), (N, K, Q)
            v = qkv[:, qk * q_ :].view(n, k_, q_)
            layer_k, layer_v = self.cache.k[i], self.cache.v[i]  # (S, K, T, Q)
            layer_k.view(n_rows, q_).index_copy_(0, rows, k.reshape(n * k_, q_))
            layer_v.view(n_rows, q_).index_copy_(0, rows, v.reshape(n * k_, q_))
            outs = []
            if b:
                if compact:
                    keys, values = layer_k[:b, :, :longest], layer_v[:b, :, :longest]
                else:
                    keys = layer_k[:, :, :longest].index_select(0, index)
                    values = layer_v[:, :, :longest].index_select(0, index)
                out = F.scaled_dot_product_attention(
                    q[:b, :, None],
                    keys,
                    values,
                    attn_mask=mask,
                    scale=self.scale,
                    enable_gqa=self.gqa,
                )  # (B, H, 1, Q)
                outs.append(out.reshape(b, h_ * q_))
            for (offset, chunk), cmask in zip(spans, chunk_masks, strict=True):
                t = len(chunk.token_ids)
                qc = q[offset : offset + t].transpose(0, 1)[None]  # (1, H, T, Q)
                if cmask is None:  # a whole prompt or its first chunk: as HF computes it
                    kc = k[offset : offset + t].transpose(0, 1)[None]
                    vc = v[offset : offset + t].transpose(0, 1)[None]
                    out = F.scaled_dot_product_attention(
                        qc, kc, vc, is_causal=True, scale=self.scale, enable_gqa=self.gqa
                    )
                else:  # a later chunk: the cached prefix, and itself causally
                    end = chunk.start + t
                    kc = layer_k[chunk.slot : chunk.slot + 1, :, :end]  # (1, K, end, Q)
                    vc = layer_v[chunk.slot : chunk.slot + 1, :, :end]
                    out = F.scaled_dot_product_attention(
                        qc, kc, vc, attn_mask=cmask, scale=self.scale, enable_gqa=self.gqa
                    )
                outs.append(out[0].transpose(0, 1).reshape(t, h_ * q_))
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, H·Q)
            x = x + layer.o(attn)
            x = x + self._mlp(self._rms(x, layer.ln_post), layer)
        # logits only where a token is sampled: every decode row, each finished prompt's last
        wanted = list(range(b)) + [o + len(c.token_ids) - 1 for o, c in spans if c.want_logits]
        if not wanted:
            return None
        if len(wanted) < n:
            x = x.index_select(0, torch.tensor(wanted, device=dev))
        return self._logits(x)  # (rows, V)

    def prefill(
        self, slot: int, token_ids: Sequence[int], start: int, *, want_logits: bool
    ) -> Tensor | None:
        """Prefill one sequence alone; the next-token logits (V,) when ``want_logits``."""
        out = self.step([Chunk(slot, token_ids, start, want_logits)], [], [], [])
        return None if out is None else out[0]

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> Tensor:
        """One token for each sequence; the next-token logits (B, V)."""
        out = self.step([], slots, token_ids, positions)
        assert out is not None
        return out

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

    def step(
        self,
        chunks: Sequence[Chunk],
        slots: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
    ) -> Tensor | None:
        return decode_then_prefill(self, chunks, slots, token_ids, positions)

    def move(self, src: int, dst: int, length: int) -> None:
        if src == dst:
            return
        self.caches[dst], self.caches[src] = self.caches[src], None
        self.encoded[dst], self.encoded[src] = self.encoded[src], None

    def release(self, slot: int) -> None:
        self.caches[slot] = None
        self.encoded[slot] = None


class _DecodePrefill(Protocol):
    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> Tensor: ...

    def prefill(
        self, slot: int, token_ids: Sequence[int], start: int, *, want_logits: bool
    ) -> Tensor | None: ...


def decode_then_prefill(
    runner: _DecodePrefill,
    chunks: Sequence[Chunk],
    slots: Sequence[int],
    token_ids: Sequence[int],
    positions: Sequence[int],
) -> Tensor | None:
    """A step for runners that cannot mix prompt chunks into the decode batch: the decode
    rows in one ``decode`` call, then each chunk in its own ``prefill``; the rows stacked in
    the order :meth:`Runner.step` promises."""
    rows = [runner.decode(slots, token_ids, positions)] if slots else []
    for c in chunks:
        out = runner.prefill(c.slot, c.token_ids, c.start, want_logits=c.want_logits)
        if out is not None:
            rows.append(out[None])
    if not rows:
        return None
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def build_runner(
    model: PreTrainedModel, *, n_slots: int, max_len: int, kind: str = "auto"
) -> LlamaRunner | HFRunner:
    """The fast runner when the architecture allows it (``kind="auto"``), else the fallback."""
    if kind not in ("auto", "llama", "hf"):
        raise GenloopError(f"unknown runner {kind!r} (runners: auto, llama, hf)")
    if kind == "llama" or (kind == "auto" and supports_fast_path(model)):
        return LlamaRunner(model, n_slots=n_slots, max_len=max_len)
    return HFRunner(model, n_slots=n_slots, max_len=max_len)
