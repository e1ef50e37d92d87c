"""The seq2seq family: a T5-style encoder-decoder (transformers ``T5ForConditionalGeneration``)
for input → output tasks, pretrained with T5's span corruption
(``genloop.train.span_corruption``) and fine-tuned on pairs (``sft``).

A batch is a dict of tensors:

- ``input_ids`` (B, S) and optional ``attention_mask`` (B, S): the input, for the encoder;
- ``labels`` (B, T): the output, -100 where there is no loss (padding). The decoder reads
  the labels shifted right behind ``decoder_start_token_id`` (the pad id, as in T5);
- ``decoder_attention_mask`` (B, T), optional.

Presets (tied embeddings, gated MLP as in T5 v1.1; counts at vocab 8192):

=========  =========  =========  ======  ======  ============  ==========
preset     enc. lay.  dec. lay.  n_embd  n_head  interm. size  parameters
=========  =========  =========  ======  ======  ============  ==========
``tiny``           2          2     256       4           704   5,836,032
``small``          4          4     512       8         1,408  34,090,496
=========  =========  =========  ======  ======  ============  ==========
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from genloop.errors import ConfigError, GenloopError
from genloop.models.family import Family, count_parameters
from genloop.models.presets import ACTIVATIONS, DEFAULT_VOCAB_SIZE, mlp_size
from genloop.models.pretrained import load_pretrained, save_hf_dir
from genloop.models.token_loss import token_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel, T5Config

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_embd": 256, "n_head": 4},
    "small": {"n_layer": 4, "n_embd": 512, "n_head": 8},
}
OVERRIDES = (
    "n_layer",
    "n_decoder_layer",
    "n_embd",
    "n_head",
    "intermediate_size",
    "activation",
    "dropout",
    "norm_eps",
    "relative_attention_buckets",
    "relative_attention_max_distance",
    "pad_token_id",
    "eos_token_id",
)
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")


@dataclass(frozen=True)
class Seq2SeqSpec:
    """A complete T5-style architecture in genloop's names (see ``to_t5_config``)."""

    n_layer: int  # encoder layers
    n_decoder_layer: int
    n_embd: int
    n_head: int
    intermediate_size: int
    vocab_size: int = DEFAULT_VOCAB_SIZE
    activation: str = "gelu"  # gated: "gelu" gives T5 v1.1's gated-gelu (tanh approximation)
    dropout: float = 0.0
    norm_eps: float = 1e-6
    relative_attention_buckets: int = 32
    relative_attention_max_distance: int = 128
    pad_token_id: int = 0
    eos_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self) -> int:
        """Exact parameter count of the model ``to_t5_config`` builds (no biases)."""
        d, i = self.n_embd, self.intermediate_size
        attn = 4 * d * (self.n_head * self.head_dim)  # q, k, v, o
        mlp = 3 * d * i  # gated: wi_0, wi_1, wo
        encoder = self.n_layer * (attn + mlp + 2 * d) + d  # + final norm
        decoder = self.n_decoder_layer * (2 * attn + mlp + 3 * d) + d  # self + cross attention
        # The first layer of each stack holds the relative position bias (buckets × heads).
        bias = 2 * self.relative_attention_buckets * self.n_head
        return self.vocab_size * d + encoder + decoder + bias  # embedding shared with the head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_t5_config(self) -> T5Config:
        from transformers import T5Config

        config: T5Config = T5Config(
            vocab_size=self.vocab_size,
            d_model=self.n_embd,
            d_kv=self.head_dim,
            d_ff=self.intermediate_size,
            num_layers=self.n_layer,
            num_decoder_layers=self.n_decoder_layer,
            num_heads=self.n_head,
            relative_attention_num_buckets=self.relative_attention_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            dropout_rate=self.dropout,
            layer_norm_epsilon=self.norm_eps,
            feed_forward_proj=f"gated-{self.activation}",
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )
        # Not a declared T5Config field in transformers 5, but T5 reads it to shift labels.
        config.decoder_start_token_id = self.pad_token_id
        return config


def seq2seq_spec(
    preset: str = "tiny", *, vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides: Any
) -> Seq2SeqSpec:
    """The spec of ``preset`` with ``overrides`` (see ``OVERRIDES``) applied.

    ``n_decoder_layer`` follows ``n_layer`` and ``intermediate_size`` follows ``n_embd``
    unless they are given themselves. An override of None counts as not given.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown seq2seq preset {preset!r} (presets: {', '.join(PRESETS)})")
    for key in overrides:
        if key not in OVERRIDES:
            raise ConfigError(
                f"unknown seq2seq setting {key!r} "
                f"(valid: preset, vocab_size, {', '.join(OVERRIDES)})"
            )
    given = {k: v for k, v in overrides.items() if v is not None}  # None: not given
    values: dict[str, Any] = {**PRESETS[preset], **given}
    values.setdefault("n_decoder_layer", values["n_layer"])
    values.setdefault("intermediate_size", mlp_size(values["n_embd"]))
    for key in ("n_layer", "n_decoder_layer", "n_embd", "n_head", "intermediate_size"):
        _check_int(key, values[key])
    _check_int("vocab_size", vocab_size)
    for key in ("relative_attention_buckets", "relative_attention_max_distance"):
        if key in values:
            _check_int(key, values[key])
    for key in ("pad_token_id", "eos_token_id"):
        if key in values:
            _check_int(key, values[key], minimum=0)
    if values["n_embd"] % values["n_head"]:
        raise ConfigError(
            f"n_embd ({values['n_embd']}) must be divisible by n_head ({values['n_head']})"
        )
    if values.get("activation", "gelu") not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {values['activation']!r} (activations: {', '.join(ACTIVATIONS)})"
        )
    dropout = values.get("dropout", 0.0)
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a number in [0, 1) (got {dropout!r})")
    return Seq2SeqSpec(vocab_size=vocab_size, **values)


def spec_from_config(config: Mapping[str, Any]) -> Seq2SeqSpec:
    """A spec from a plain config dict: ``preset`` (default tiny), ``vocab_size``, overrides."""
    values = dict(config)
    preset = values.pop("preset", None) or "tiny"
    vocab_size = values.pop("vocab_size", None) or DEFAULT_VOCAB_SIZE
    return seq2seq_spec(preset, vocab_size=vocab_size, **values)


def forward_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The decoder's logits (B, T, V) for predicting ``labels`` under teacher forcing."""
    _check_batch(batch)
    labels = batch["labels"]
    # labels shifted right behind decoder_start_token_id, -100 replaced by the pad id
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)  # type: ignore[operator]
    logits: Tensor = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=batch.get("decoder_attention_mask"),
        use_cache=False,
    ).logits
    return logits


def seq2seq_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    label_smoothing: float = 0.0,
    z_loss_coef: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Cross-entropy of the output tokens given the input (see ``token_loss``)."""
    logits = forward_logits(model, batch)  # (B, T, V), position t predicts labels[:, t]
    return token_loss(
        logits,
        batch["labels"],
        label_smoothing=label_smoothing,
        z_loss_coef=z_loss_coef,
        reduction=reduction,
    )


class Seq2Seq:
    """The ``seq2seq`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "seq2seq"

    def build(self, config: Mapping[str, Any]) -> PreTrainedModel:
        """A freshly initialised ``T5ForConditionalGeneration``; seed torch first."""
        from transformers import AutoModelForSeq2SeqLM

        t5_config = spec_from_config(config).to_t5_config()
        model: PreTrainedModel = AutoModelForSeq2SeqLM.from_config(  # type: ignore[no-untyped-call]
            t5_config, attn_implementation="sdpa"
        )
        return model

    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, Tensor],
        *,
        label_smoothing: float = 0.0,
        z_loss_coef: float = 0.0,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> Tensor:
        return seq2seq_loss(
            model,
            batch,
            label_smoothing=label_smoothing,
            z_loss_coef=z_loss_coef,
            reduction=reduction,
        )

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        return save_hf_dir(
            model, out_dir, family="seq2seq", tokenizer_dir=tokenizer_dir, extra=extra
        )

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> PreTrainedModel:
        return load_pretrained(
            path, family="seq2seq", device=device, dtype=dtype, trust_pickle=trust_pickle
        )

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


FAMILY: Family = Seq2Seq()  # annotated so mypy checks the protocol


def _check_batch(batch: Mapping[str, Tensor]) -> None:
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise GenloopError(
            f"a seq2seq batch needs {' and '.join(missing)} (got keys: {', '.join(batch)})"
        )
    unknown = [k for k in batch if k not in BATCH_KEYS]
    if unknown:
        raise GenloopError(
            f"unexpected batch keys {', '.join(unknown)} for seq2seq "
            f"(valid: {', '.join(BATCH_KEYS)})"
        )


def _check_int(key: str, value: Any, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ConfigError(f"{key} must be {kind} (got {value!r})")
