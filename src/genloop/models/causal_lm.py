"""The causal LM family: a Llama-style decoder (transformers ``LlamaForCausalLM``).

genloop builds Llama-style models from presets (``presets.py``); it loads and fine-tunes any
decoder-only model transformers can build offline (GPT-2, Mistral, Qwen2, …). Every model
it saves is a standard checkpoint that transformers and vLLM read unchanged.

A batch is a dict of (B, T) tensors:

- ``input_ids`` (long), required;
- ``attention_mask`` (0/1), optional: 0 marks padding, which takes no part in the loss;
- ``labels`` (long), optional, aligned with ``input_ids`` (HF convention: the shift happens
  here): -100 marks a position without a loss, such as the prompt in SFT. Without
  ``labels`` every (unpadded) next token counts, as in pretraining on packed shards;
- ``position_ids``, optional, passed through to the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.models.family import Family, count_parameters
from genloop.models.presets import spec_from_config
from genloop.models.pretrained import load_pretrained, save_hf_dir
from genloop.models.token_loss import IGNORE_INDEX, token_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


def forward_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The model's logits (B, T, V) for ``batch`` (labels are not passed to the model)."""
    _check_batch(batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits: Tensor = model(**inputs, use_cache=False).logits
    return logits


def next_token_targets(batch: Mapping[str, Tensor]) -> Tensor:
    """Targets (B, T-1) for logits[:, :-1]: the labels (or input ids) shifted left by one."""
    _check_batch(batch)
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    elif labels.shape != batch["input_ids"].shape:
        raise GenloopError(
            f"labels {tuple(labels.shape)} must have the shape of input_ids "
            f"{tuple(batch['input_ids'].shape)} (the shift happens in the loss)"
        )
    return labels[:, 1:]


def lm_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    label_smoothing: float = 0.0,
    z_loss_coef: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Next-token cross-entropy: position t predicts token t+1 (see ``token_loss``)."""
    logits = forward_logits(model, batch)  # (B, T, V)
    return token_loss(
        logits[:, :-1],
        next_token_targets(batch),
        label_smoothing=label_smoothing,
        z_loss_coef=z_loss_coef,
        reduction=reduction,
    )


class CausalLM:
    """The ``causal_lm`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "causal_lm"

    def build(self, config: Mapping[str, Any]) -> PreTrainedModel:
        """A freshly initialised ``LlamaForCausalLM`` from ``preset``, ``vocab_size``, overrides.

        Seed torch first for a reproducible initialisation.
        """
        from transformers import AutoModelForCausalLM

        llama_config = spec_from_config(config).to_llama_config()
        model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            llama_config, attn_implementation="sdpa"
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
        return lm_loss(
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
            model, out_dir, family="causal_lm", tokenizer_dir=tokenizer_dir, extra=extra
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
            path, family="causal_lm", device=device, dtype=dtype, trust_pickle=trust_pickle
        )

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


FAMILY: Family = CausalLM()  # annotated so mypy checks the protocol


def _check_batch(batch: Mapping[str, Tensor]) -> None:
    if "input_ids" not in batch:
        raise GenloopError(f"a causal_lm batch needs input_ids (got keys: {', '.join(batch)})")
    unknown = [k for k in batch if k not in BATCH_KEYS]
    if unknown:
        raise GenloopError(
            f"unexpected batch keys {', '.join(unknown)} for causal_lm "
            f"(valid: {', '.join(BATCH_KEYS)})"
        )
    if batch["input_ids"].dim() != 2:
        raise GenloopError(f"input_ids must be (B, T), got {tuple(batch['input_ids'].shape)}")
