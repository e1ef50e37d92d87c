"""The model forward for the engine: one step = prefill chunks + a decode batch.

Two PyTorch runners share one small interface (:class:`Runner`, whose ``step`` takes the
prompt chunks to prefill and the sequences to decode one token each, and returns their
logits):

- :class:`DecoderRunner` (kind ``native``), the batched path for every decoder family in
  ``architectures.BATCHED_MODEL_TYPES`` (Llama, Mistral, Qwen 2/3, Gemma 2/3, Phi-3,
  GPT-2, GPT-NeoX, OLMo 2): ``decoder_weights`` reads the Hugging Face modules' weights
  into one structure and the runner computes its own forward over a preallocated slot
  cache (``kv_cache.KVCache``). A step is one forward over every token of the step: the
  projections and MLPs see them all at once, the decode rows attend (batched, each at its
  own position with its own mask) to their slots, each prompt chunk attends causally to
  itself and its cached prefix. The arithmetic is the same as transformers' (norms in
  fp32 as each family rounds them, the same rotary tables, SDPA, or Gemma 2's soft-capped
  eager attention), so greedy decoding in fp32 gives Hugging Face ``generate``'s tokens
  (``tests/serve`` checks it for every family, alone and inside a busy batch). Per step
  it launches a few dozen tensor ops per layer instead of the HF forward's hundreds, which
  is what matters for small models on a CPU. int8 variants (``genloop optimize
  --quantize int8``) take it too, their q/k/v and gate/up int8 layers fused the same way
  (exactly: each output channel keeps its own row and scale). With int8 *dynamic* the
  activations are quantized per call over the whole step, so a sequence's rounding may
  depend on what shares its batch; weight-only int8 does not.
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
from genloop.models.pretrained import cache_argument
from genloop.serve.engine.decoder_weights import (
    DecoderLayer,
    Norm,
    read_decoder,
    supports_model,
)
from genloop.serve.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of one sequence to prefill: positions ``start..start+len(token_ids)``."""

    slot: int
    token_ids: Sequence[int]
    start: int
    want_logits: bool  # the last chunk of a prompt: its next-token logits are wanted
    # every position's logits (a request that scores its prompt: prompt_logprobs); off for
    # every other request, which then costs nothing more
    all_logits: bool = False


class Runner(Protocol):
    """What the engine needs from a model: one forward per step over a mixed batch."""

    kind: str  # "native", "hf" or "onnx"
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
        decoded sequence, then for each chunk in order one row per position when it wants
        ``all_logits``, else one (its last position's) when it wants logits (None when no
        row)."""
        ...

    def move(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's state (its first ``length`` positions) from ``src`` to ``dst``."""
        ...

    def release(self, slot: int) -> None: ...


# ------------------------------------------------------------------------ native path


def supports_native(model: Any, max_len: int | None = None) -> bool:
    """Whether :class:`DecoderRunner` computes ``model`` exactly (for sequences up to
    ``max_len``): one of ``architectures.BATCHED_MODEL_TYPES`` with a config it supports,
    its linear layers float or int8 (``decoder_weights.supports_model``)."""
    return supports_model(model, max_len)


class DecoderRunner:
    """Batched decode and chunked prefill over a slot cache, for every decoder family in
    ``architectures.BATCHED_MODEL_TYPES`` (their weights read by ``decoder_weights``)."""

    kind = "native"

    def __init__(
        self, model: PreTrainedModel, *, n_slots: int, max_len: int, prefill_chunk: int = 512
    ) -> None:
        w = read_decoder(model, max_len)  # a GenloopError naming why, for one it cannot run
        self.weights = w
        config: Any = model.config
        self.n_slots = n_slots
        self.max_len = max_len
        self.prefill_chunk: int | None = prefill_chunk
        self.vocab_size = int(config.vocab_size)
        self.n_heads, self.n_kv_heads, self.head_dim = w.n_heads, w.n_kv_heads, w.head_dim
        self.gqa = self.n_kv_heads != self.n_heads
        self.device, self.dtype = w.embed.device, w.embed.dtype  # float in every variant
        if w.positions is not None and max_len > w.positions.shape[0]:
            raise GenloopError(
                f"sequences of {max_len} positions exceed the model's {w.positions.shape[0]}"
            )
        self.layers: list[DecoderLayer] = w.layers
        self.act: Callable[[Tensor], Tensor] = w.act
        # The rotary tables for every position, computed as the models' rotary embeddings
        # do: fp32 position × inv_freq, duplicated, cos/sin times the attention scaling. R
        # (the rotary dims) is Q, or less for a partial rotary (GPT-NeoX, Phi-3).
        self.rotary_dim = 2 * len(w.rotary[0][0]) if w.rotary else 0
        positions = torch.arange(max_len, device=self.device, dtype=torch.float32)
        table_dtype = torch.float32 if w.rotary_fp32 else self.dtype
        self.tables: list[tuple[Tensor, Tensor]] = []
        for inv_freq, scaling in w.rotary:
            freqs = positions[:, None] * inv_freq.to(self.device, torch.float32)  # (T, R/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (T, R)
            cos = (emb.cos() * scaling).to(table_dtype)
            sin = (emb.sin() * scaling).to(table_dtype)
            half = self.rotary_dim // 2
            self.tables.append((cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)))
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
        self._windows = sorted({layer.window for layer in self.layers}, key=lambda v: v or 0)

    # ---------------------------------------------------------------- building blocks

    def _norm(self, x: Tensor, norm: Norm) -> Tensor:
        width = (x.shape[-1],)
        if norm.kind == "layer":
            return F.layer_norm(x, width, norm.weight, norm.bias, norm.eps)
        if x.dtype == torch.float32:
            # one fused op, bit for bit the models' RMSNorm in fp32 (every kind agrees there);
            # per-head q/k norms' stacked (heads, Q) weight multiplies after it
            if norm.weight.dim() == 1:
                return F.rms_norm(x, width, norm.weight.float(), norm.eps)
            return F.rms_norm(x, width, None, norm.eps) * norm.weight
        # step for step: fp32 statistics; Llama's kind casts back before the weight,
        # OLMo 2's and Gemma's multiply in fp32 and cast after
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
        if norm.kind == "rms":
            return norm.weight * h.to(x.dtype)
        return (h * norm.weight).to(x.dtype)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # x·cos + rotate_half(x)·sin, where rotate_half(x) = (-x2, x1): rolling x by half the
        # rotary dims gives (x2, x1), and the sign lives in the sin table (-sin, sin).
        # Negation is exact, so the values are those of apply_rotary_pos_emb, in 4 ops
        # instead of 7. A partial rotary turns the first R dims and passes the rest.
        r = self.rotary_dim
        if r == self.head_dim:
            return (x * cos) + (x.roll(r // 2, dims=-1) * sin)
        turned = x[..., :r]
        turned = (turned * cos) + (turned.roll(r // 2, dims=-1) * sin)
        return torch.cat((turned, x[..., r:]), dim=-1)

    def _qkv(
        self, qkv: Tensor, layer: DecoderLayer, rope: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (N, H, Q), keys and values (N, K, Q) from the fused projection's output:
        q/k normed where the family norms them, then roped (q and k together)."""
        n = qkv.shape[0]
        h_, k_, q_ = self.n_heads, self.n_kv_heads, self.head_dim
        if self.weights.qkv_per_head:  # GPT-NeoX: (N, H, 3, Q), each head's q, k, v
            heads = qkv.view(n, h_, 3, q_)
            qk = heads[:, :, :2]
            if rope is not None:
                qk = self._rope(qk, rope[0][:, None], rope[1][:, None])
            return qk[:, :, 0], qk[:, :, 1], heads[:, :, 2]
        width = (h_ + k_) * q_
        qk = qkv[:, :width]
        if layer.q_norm is not None and layer.k_norm is not None:
            if self.weights.qk_norm_per_head:  # one op over (N, H + K, Q), weights stacked
                qk = self._norm(qk.reshape(n, h_ + k_, q_), layer.q_norm)
            else:  # OLMo 2: over the whole q and the whole k projection
                split = h_ * q_
                q_part = self._norm(qk[:, :split], layer.q_norm)
                qk = torch.cat((q_part, self._norm(qk[:, split:], layer.k_norm)), dim=-1)
        qk = qk.view(n, h_ + k_, q_)
        if rope is not None:
            qk = self._rope(qk, *rope).to(self.dtype)  # a no-op but for fp32 tables
        return qk[:, :h_], qk[:, h_:], qkv[:, width:].view(n, k_, q_)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        """Attention of q (B, H, Tq, Q) over k, v (B, K, Tk, Q); ``mask`` additive, None:
        causal when Tq > 1 (a whole first chunk), else every key."""
        softcap = self.weights.attn_softcap
        causal = mask is None and q.shape[2] > 1
        if softcap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=self.gqa
            )
        # Gemma 2's eager attention (SDPA cannot soft-cap): scores·scale, tanh-capped,
        # masked, softmax in fp32, in place where the values allow. With grouped-query
        # attention each key/value head's query heads go through one matmul against it
        # (B, K, G·Tq, Q), instead of copying the keys and values G times as repeat_kv does.
        b, h, t, d = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        grouped = q.reshape(b, kv_heads, (h // kv_heads) * t, d)
        scores = torch.matmul(grouped, k.transpose(2, 3)).view(b, h, t, keys)
        scores.mul_(scale).div_(softcap).tanh_().mul_(softcap)
        if causal:
            mask = self._additive(self._positions[:t][None, :] > self._positions[:t][:, None])
        if mask is not None:
            scores.add_(mask)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs.view(b, kv_heads, -1, keys), v)  # (B, K, G·Tq, Q)
        return out.view(b, h, t, d)

    def _additive(self, hidden: Tensor) -> Tensor:
        """An additive mask (0 where seen, -inf where ``hidden``) in the model's dtype."""
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(hidden, float("-inf"))

    def _mlp(self, x: Tensor, layer: DecoderLayer) -> Tensor:
        if self.weights.gated:
            gate, up = layer.up(x).chunk(2, dim=-1)
            return layer.down(self.act(gate) * up)
        return layer.down(self.act(layer.up(x)))

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.weights.lm_head(self._norm(x, self.weights.final_norm))
        cap = self.weights.final_softcap
        if cap is not None:  # in place: the same values, no (rows, V) temporaries
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits.float()

    def _masks(
        self, window: int | None, positions: Sequence[int], pos: Tensor, spans: list[Any]
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """The decode rows' mask (B, 1, 1, T) and each chunk's (t, end), additive, for
        layers with this attention window; None where nothing is hidden (a decode row
        alone, a first chunk within the window: causal)."""
        b = len(positions)
        decode = None
        if b and (b > 1 or (window is not None and max(positions) >= window)):
            longest = max(positions) + 1
            keys = self._positions[:longest][None, :]
            rows = pos[:b, None]
            hidden = keys > rows  # each row sees its own positions 0..pos
            if window is not None:
                hidden = hidden | (keys <= rows - window)
            decode = self._additive(hidden)[:, None, None, :]
        chunks: list[Tensor | None] = []
        for _, chunk in spans:
            t, start = len(chunk.token_ids), chunk.start
            if start == 0 and (window is None or t <= window):
                chunks.append(None)
                continue
            keys = self._positions[: start + t][None, :]
            rows = self._positions[start : start + t][:, None]
            hidden = keys > rows
            if window is not None:
                hidden = hidden | (keys <= rows - window)
            chunks.append(self._additive(hidden))
        return decode, chunks

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
        chunk, exactly as the Hugging Face forward does) or to its cached prefix. Layers
        with a sliding window hide the keys that fell out of it.
        """
        w = self.weights
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
        ropes = [(cos[pos][:, None], sin[pos][:, None]) for cos, sin in self.tables]  # (N, 1, R)
        x = F.embedding(torch.tensor(all_tokens, device=dev), w.embed)  # (N, d)
        if w.embed_scale is not None:
            x = x * w.embed_scale
        if w.positions is not None:
            x = x + F.embedding(pos, w.positions)

        longest = max(positions) + 1 if b else 0
        compact = all(s == i for i, s in enumerate(slots))  # slots 0..B-1: read views
        index = slot_t[:b]
        masks = {window: self._masks(window, positions, pos, spans) for window in self._windows}
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.attn_norm) if layer.attn_norm is not None else x
            q, k, v = self._qkv(layer.qkv(h), layer, ropes[layer.rope] if ropes else None)
            layer_k, layer_v = self.cache.k[i], self.cache.v[i]  # (S, K, T, Q)
            layer_k.view(n_rows, q_).index_copy_(0, rows, k.reshape(n * k_, q_))
            layer_v.view(n_rows, q_).index_copy_(0, rows, v.reshape(n * k_, q_))
            decode_mask, chunk_masks = masks[layer.window]
            outs = []
            if b:
                if compact:
                    keys, values = layer_k[:b, :, :longest], layer_v[:b, :, :longest]
                else:
                    keys = layer_k[:, :, :longest].index_select(0, index)
                    values = layer_v[:, :, :longest].index_select(0, index)
                out = self._attend(q[:b, :, None], keys, values, decode_mask, layer.scale)
                outs.append(out.reshape(b, h_ * q_))  # (B, H, 1, Q) → (B, H·Q)
            for (offset, chunk), cmask in zip(spans, chunk_masks, strict=True):
                t = len(chunk.token_ids)
                qc = q[offset : offset + t].transpose(0, 1)[None]  # (1, H, t, Q)
                if cmask is None:  # a whole prompt or its first chunk: as HF computes it
                    kc = k[offset : offset + t].transpose(0, 1)[None]
                    vc = v[offset : offset + t].transpose(0, 1)[None]
                else:  # a later chunk (or past the window): the cache up to its end
                    end = chunk.start + t
                    kc = layer_k[chunk.slot : chunk.slot + 1, :, :end]  # (1, K, end, Q)
                    vc = layer_v[chunk.slot : chunk.slot + 1, :, :end]
                out = self._attend(qc, kc, vc, cmask, layer.scale)
                outs.append(out[0].transpose(0, 1).reshape(t, h_ * q_))
            attn = layer.o(outs[0] if len(outs) == 1 else torch.cat(outs))  # (N, d)
            if w.parallel_residual:  # GPT-NeoX: mlp(ln2(x)) + attn + x, in that order
                x = self._mlp(self._norm(x, layer.mlp_norm), layer) + attn + x  # type: ignore[arg-type]
                continue
            if layer.attn_out_norm is not None:
                attn = self._norm(attn, layer.attn_out_norm)
            x = x + attn
            h = self._norm(x, layer.mlp_norm) if layer.mlp_norm is not None else x
            mlp = self._mlp(h, layer)
            if layer.mlp_out_norm is not None:
                mlp = self._norm(mlp, layer.mlp_out_norm)
            x = x + mlp
        # logits only where a token is sampled (every decode row, each finished prompt's
        # last) or a prompt is scored (every position of its chunks)
        wanted = list(range(b))
        for o, c in spans:
            t = len(c.token_ids)
            if c.all_logits:
                wanted.extend(range(o, o + t))
            elif c.want_logits:
                wanted.append(o + t - 1)
        if not wanted:
            return None
        if len(wanted) < n:
            x = x.index_select(0, torch.tensor(wanted, device=dev))
        return self._logits(x)  # (rows, V)

    def prefill(
        self,
        slot: int,
        token_ids: Sequence[int],
        start: int,
        *,
        want_logits: bool,
        all_logits: bool = False,
    ) -> Tensor | None:
        """Prefill one sequence alone; the next-token logits (V,) when ``want_logits``, every
        position's (t, V) when ``all_logits``."""
        out = self.step([Chunk(slot, token_ids, start, want_logits, all_logits)], [], [], [])
        if out is None or all_logits:
            return out
        return out[0]

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
        self.cache_kw = cache_argument(model)  # the caches are updated in place

    @torch.inference_mode()
    def prefill(
        self,
        slot: int,
        token_ids: Sequence[int],
        start: int,
        *,
        want_logits: bool,
        all_logits: bool = False,
    ) -> Tensor | None:
        from transformers import DynamicCache, EncoderDecoderCache

        ids = torch.tensor([list(token_ids)], device=self.device)
        if self.encoder_decoder:
            encoded = self.model.get_encoder()(input_ids=ids)
            cache: Any = EncoderDecoderCache(DynamicCache(), DynamicCache())
            first = torch.tensor([[self.decoder_start]], device=self.device)
            out = self.model(
                encoder_outputs=encoded, decoder_input_ids=first, **{self.cache_kw: cache}
            )
            self.encoded[slot] = encoded
        else:
            cache = DynamicCache() if start == 0 else self.caches[slot]
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_kw: cache})
        self.caches[slot] = cache
        logits: Tensor = out.logits[0]  # (t, V)
        if all_logits and not self.encoder_decoder:
            return logits.float()
        return logits[-1].float() if want_logits else None

    @torch.inference_mode()
    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> Tensor:
        rows = []
        for slot, token in zip(slots, token_ids, strict=True):
            ids = torch.tensor([[token]], device=self.device)
            cache = {self.cache_kw: self.caches[slot]}  # updated in place
            if self.encoder_decoder:
                out = self.model(encoder_outputs=self.encoded[slot], decoder_input_ids=ids, **cache)
            else:
                out = self.model(input_ids=ids, use_cache=True, **cache)
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
        self,
        slot: int,
        token_ids: Sequence[int],
        start: int,
        *,
        want_logits: bool,
        all_logits: bool = False,
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
        if c.all_logits:
            out = runner.prefill(c.slot, c.token_ids, c.start, want_logits=True, all_logits=True)
            assert out is not None
            rows.append(out)  # (t, V)
            continue
        out = runner.prefill(c.slot, c.token_ids, c.start, want_logits=c.want_logits)
        if out is not None:
            rows.append(out[None])
    if not rows:
        return None
    return rows[0] if len(rows) == 1 else torch.cat(rows)


RUNNER_KINDS = ("auto", "native", "hf")


def build_runner(
    model: PreTrainedModel, *, n_slots: int, max_len: int, kind: str = "auto"
) -> DecoderRunner | HFRunner:
    """The native batched runner when the architecture allows it (``kind="auto"``), else
    the fallback. ``kind`` forces one ("llama", the native runner's former name, is read
    as "native")."""
    kind = "native" if kind == "llama" else kind
    if kind not in RUNNER_KINDS:
        raise GenloopError(f"unknown runner {kind!r} (runners: {', '.join(RUNNER_KINDS)})")
    if kind == "native" or (kind == "auto" and supports_native(model, max_len)):
        return DecoderRunner(model, n_slots=n_slots, max_len=max_len)
    return HFRunner(model, n_slots=n_slots, max_len=max_len)
