"""Named sizes for the Llama-style causal LM, architecture overrides, and size arithmetic.

A preset is a starting point; any field can be overridden by its genloop name::

    spec = causal_lm_spec("tiny", vocab_size=8192, n_layer=2, activation="gelu")
    spec.to_llama_config()          # -> transformers.LlamaConfig
    estimate_params("base")         # counted from the spec, nothing is built

Parameter counts at vocab 8192 (tied embeddings; ``tests/models/test_presets.py`` checks
them against the nominal sizes and against real models):

========  =======  ======  ======  =============  =======  ============  ===========
preset    n_layer  n_embd  n_head  interm. size   context  parameters    non-embed.
========  =======  ======  ======  =============  =======  ============  ===========
``tiny``        4     256       4            704      512     5,310,720    3,213,568
``small``       8     512       8          1,408    1,024    29,893,120   25,698,816
``base``       16     768      12          2,048    2,048   119,563,008  113,271,552
========  =======  ======  ======  =============  =======  ============  ===========

The count grows with the vocabulary (``vocab_size × n_embd`` for the embedding table, twice
that when ``tie_embeddings`` is false), so a 32k vocabulary makes ``tiny`` about 11M.

Notation (Llama / PaLM): L layers, d = ``n_embd``, H query heads, Q head dim (= d / H),
K key/value heads (grouped-query attention when K < H), I the MLP's intermediate size,
V the vocabulary, T the sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError

if TYPE_CHECKING:
    from transformers import LlamaConfig

DEFAULT_VOCAB_SIZE = 8192

# Llama's MLP is gated (act(x W_gate) * x W_up), so "gelu" gives GeGLU and "silu" SwiGLU.
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 4, "n_embd": 256, "n_head": 4, "context_length": 512},
    "small": {"n_layer": 8, "n_embd": 512, "n_head": 8, "context_length": 1024},
    "base": {"n_layer": 16, "n_embd": 768, "n_head": 12, "context_length": 2048},
}

# The nominal sizes the preset names promise (at DEFAULT_VOCAB_SIZE).
NOMINAL_SIZES = {"tiny": 5_000_000, "small": 30_000_000, "base": 125_000_000}

# The architecture keys a model section sets (``ModelConfig``; the loop's builders and
# ``genloop plan`` read them from here), and those the spec also takes from Python.
ARCHITECTURE_KEYS = (
    "n_layer",
    "n_embd",
    "n_head",
    "n_kv_head",
    "intermediate_size",
    "activation",
    "context_length",
    "dropout",
    "tie_embeddings",
)
OVERRIDES = (*ARCHITECTURE_KEYS, "rope_theta", "norm_eps")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def mlp_size(n_embd: int) -> int:
    """Llama's intermediate size: 8/3·d (same FLOPs as a 4·d ungated MLP), rounded up to 64."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


@dataclass(frozen=True)
class CausalLMSpec:
    """A complete Llama-style architecture in genloop's names (see ``to_llama_config``)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    intermediate_size: int
    vocab_size: int = DEFAULT_VOCAB_SIZE
    activation: str = "silu"
    context_length: int = 1024
    dropout: float = 0.0  # Llama has attention dropout only (no residual or MLP dropout)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        """Exact parameter count of the model ``to_llama_config`` builds (no biases).

        ``non_embedding`` leaves out the embedding table and the output head (Kaplan's N).
        """
        d, q, i = self.n_embd, self.head_dim, self.intermediate_size
        attn = d * (self.n_head * q) * 2 + d * (self.n_kv_head * q) * 2  # q, o; k, v
        mlp = 3 * d * i  # gate, up, down
        norms = 2 * d  # input and post-attention RMSNorm
        body = self.n_layer * (attn + mlp + norms) + d  # + final norm
        if non_embedding:
            return body
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return body + embed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_llama_config(self) -> LlamaConfig:
        """The equivalent ``transformers.LlamaConfig``."""
        from transformers import LlamaConfig

        config: LlamaConfig = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.n_embd,
            num_hidden_layers=self.n_layer,
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_kv_head,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            hidden_act=self.activation,
            max_position_embeddings=self.context_length,
            attention_dropout=self.dropout,
            tie_word_embeddings=self.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.norm_eps,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return config


def causal_lm_spec(
    preset: str = "tiny", *, vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides: Any
) -> CausalLMSpec:
    """The spec of ``preset`` with ``overrides`` (genloop names, see ``OVERRIDES``) applied.

    ``intermediate_size`` follows ``n_embd`` and ``n_kv_head`` follows ``n_head`` unless
    they are given themselves. An override of None counts as not given.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    valid = OVERRIDES + TOKEN_IDS
    for key in overrides:
        if key not in valid:
            raise ConfigError(
                f"unknown causal_lm setting {key!r} (valid: preset, vocab_size, {', '.join(valid)})"
            )
    given = {k: v for k, v in overrides.items() if v is not None}  # None: not given
    values: dict[str, Any] = {**PRESETS[preset], **given}
    _check_int("vocab_size", vocab_size)
    for key in ("n_layer", "n_embd", "n_head", "context_length"):
        _check_int(key, values[key])
    values.setdefault("n_kv_head", values["n_head"])
    values.setdefault("intermediate_size", mlp_size(values["n_embd"]))
    _check_int("n_kv_head", values["n_kv_head"])
    _check_int("intermediate_size", values["intermediate_size"])
    for key in TOKEN_IDS:
        if values.get(key) is not None:
            _check_int(key, values[key], minimum=0)
    if values["n_embd"] % values["n_head"]:
        raise ConfigError(
            f"n_embd ({values['n_embd']}) must be divisible by n_head ({values['n_head']})"
        )
    if values["n_head"] % values["n_kv_head"]:
        raise ConfigError(
            f"n_head ({values['n_head']}) must be divisible by n_kv_head ({values['n_kv_head']})"
        )
    activation = values.get("activation", "silu")
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {activation!r} (activations: {', '.join(ACTIVATIONS)})"
        )
    dropout = values.get("dropout", 0.0)
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be a number in [0, 1) (got {dropout!r})")
    for key in ("rope_theta", "norm_eps"):
        if key in values and (not _is_number(values[key]) or values[key] <= 0):
            raise ConfigError(f"{key} must be a positive number (got {values[key]!r})")
    if not isinstance(values.get("tie_embeddings", True), bool):
        raise ConfigError(
            f"tie_embeddings must be true or false (got {values['tie_embeddings']!r})"
        )
    return CausalLMSpec(vocab_size=vocab_size, **values)


def spec_from_config(config: Mapping[str, Any]) -> CausalLMSpec:
    """A spec from a plain config dict: ``preset`` (default tiny), ``vocab_size``, overrides."""
    values = dict(config)
    preset = values.pop("preset", None) or "tiny"
    vocab_size = values.pop("vocab_size", None) or DEFAULT_VOCAB_SIZE
    return causal_lm_spec(preset, vocab_size=vocab_size, **values)


def spec_from_hf_config(config: Any) -> CausalLMSpec:
    """The spec of a loaded Llama-style model's ``config`` (for FLOPs and size arithmetic)."""
    n_head = int(config.num_attention_heads)
    return CausalLMSpec(
        n_layer=int(config.num_hidden_layers),
        n_embd=int(config.hidden_size),
        n_head=n_head,
        n_kv_head=int(getattr(config, "num_key_value_heads", None) or n_head),
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        context_length=int(getattr(config, "max_position_embeddings", 0) or 0),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
    )


def estimate_params(
    preset: str | CausalLMSpec = "tiny",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    non_embedding: bool = False,
    **overrides: Any,
) -> int:
    """The parameter count of a preset (with overrides) or a spec, without building it."""
    if isinstance(preset, CausalLMSpec):
        spec = replace(preset, **overrides) if overrides else preset
    else:
        spec = causal_lm_spec(preset, vocab_size=vocab_size, **overrides)
    return spec.num_parameters(non_embedding=non_embedding)


def flops_per_token(spec: CausalLMSpec, seq_len: int | None = None) -> int:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM, appendix B), for MFU.

    N counts the parameters that take part in a matrix multiply for every token: all of
    them except the input embedding table, whose lookup costs no FLOPs; the output head
    (V×d, tied or not) is a real matmul and is counted. L layers, H query heads, Q head
    dim, T the sequence length (default: the spec's context length); the second term is
    attention's QKᵀ and AV, forward and backward, without discounting the causal mask.
    """
    t = spec.context_length if seq_len is None else seq_len
    n = spec.num_parameters(non_embedding=True) + spec.vocab_size * spec.n_embd
    return 6 * n + 12 * spec.n_layer * spec.n_head * spec.head_dim * t


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(key: str, value: Any, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ConfigError(f"{key} must be {kind} (got {value!r})")
