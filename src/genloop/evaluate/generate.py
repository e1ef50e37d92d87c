"""Evaluation's simple generation path: Hugging Face ``model.generate``, seeded, batched.

``generate_texts`` returns each prompt's continuation (the prompt itself is cut off).
Decoder-only prompts are left-padded by hand, with an attention mask, so the tokenizer
passed in is never modified. Temperature 0 decodes greedily; otherwise it samples with
temperature and nucleus (top-p) filtering and no top-k cut. Every generation setting is
passed explicitly, so a checkpoint's ``generation_config.json`` (a repetition penalty, say)
does not change evaluation numbers behind the caller's back.

Reproducibility. ``generate`` draws from torch's global generator and takes no
``torch.Generator``, so batch ``b`` seeds it with a number derived from ``(seed, b)``
inside ``torch.random.fork_rng``: the same model, prompts, settings, seed and batch size
give the same texts, and the caller's own random state is left as it was. Outputs may
change with the batch size (a different batch split draws differently, and padding changes
floating point sums), so callers record it with the seed.

Serving has its own engine (``serve/engine``); this path favours simplicity over speed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from genloop.errors import GenloopError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def load_model_for_eval(
    path: Path, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode, on ``device``) and tokenizer of a local checkpoint directory.

    An ONNX variant (``genloop optimize --export onnx``) runs in onnxruntime behind the same
    transformers API (``optimize.onnx_model``), on the CPU unless ``device`` is CUDA.
    """
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.pretrained import load_pretrained
    from genloop.optimize.variant import onnx_device

    model: PreTrainedModel
    on_onnx = onnx_device(Path(path), device)  # None: a PyTorch checkpoint
    if on_onnx is not None:
        from genloop.optimize.onnx_model import load_onnx_model

        model = load_onnx_model(Path(path), device=on_onnx, threads=torch.get_num_threads())
    else:
        model = load_pretrained(path, device=device)  # in eval mode
    return model, load_hf_tokenizer(Path(path))


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of one batch: well mixed, so (seed, b) pairs never collide simply."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, batch_index])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)  # torch wants < 2**63


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    stop: list[str] | None = None,
) -> list[str]:
    """Each prompt's continuation, decoded without special tokens.

    ``stop`` cuts a continuation before the first occurrence of any of its strings (after
    generation; end-of-text still ends it early). An empty prompt starts from the
    beginning-of-text token (our tokenizers: the end-of-document id, which is what a packed
    document follows in training). Prompts longer than the context allows with
    ``max_new_tokens`` keep their last tokens, with a warning.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise GenloopError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenloopError(
            f"need temperature ≥ 0 and 0 < top_p ≤ 1; got temperature={temperature}, top_p={top_p}"
        )
    if batch_size < 1:
        raise GenloopError(f"batch_size must be at least 1, not {batch_size}")
    if not prompts:
        return []

    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    pad_id, start_id, eos_ids = _special_ids(model, tokenizer)
    budget = _prompt_budget(model, max_new_tokens, encoder_decoder)
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_beams": 1,
        "num_return_sequences": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids or None,
    }
    if temperature == 0:
        settings["do_sample"] = False
    else:
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    config = GenerationConfig(**settings)  # type: ignore[no-untyped-call]

    device = next(model.parameters()).device
    rng_devices = [device] if device.type == "cuda" else []
    truncated = 0
    out: list[str] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        ids_list: list[list[int]] = []
        for prompt in prompts[start : start + batch_size]:
            ids = list(tokenizer(prompt)["input_ids"])
            if not ids:
                if start_id is None:
                    raise GenloopError(
                        "an empty prompt needs a beginning-of-text (or end-of-text) token, "
                        "and this tokenizer has neither"
                    )
                ids = [start_id]
            if budget is not None and len(ids) > budget:
                ids = ids[-budget:]
                truncated += 1
            ids_list.append(ids)
        input_ids, attention_mask = _pad(ids_list, pad_id, left=not encoder_decoder)
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            torch.manual_seed(batch_seed(seed, b))
            generated = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
        # decoder-only outputs repeat the (padded) prompt; encoder-decoder ones do not
        new = generated if encoder_decoder else generated[:, input_ids.shape[1] :]
        texts = tokenizer.batch_decode(new.cpu().tolist(), skip_special_tokens=True)
        out.extend(_cut_at_stop(t, stop) for t in texts)
    if truncated:
        log.warning(
            "%d of %d prompts were longer than the context allows with max_new_tokens=%d; "
            "they kept their last %s tokens",
            truncated,
            len(prompts),
            max_new_tokens,
            budget,
        )
    return out


def _special_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[int, int | None, list[int]]:
    """(pad id, id to start an empty prompt with, end-of-text ids)."""
    eos = tokenizer.eos_token_id
    model_eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids: list[int] = [eos] if isinstance(eos, int) else []
    if isinstance(model_eos, int):
        model_eos = [model_eos]
    for i in model_eos or []:
        if isinstance(i, int) and i not in eos_ids:
            eos_ids.append(i)
    pad = tokenizer.pad_token_id
    if not isinstance(pad, int):
        pad = eos_ids[0] if eos_ids else None
    if pad is None:
        raise GenloopError("the tokenizer has no pad or end-of-text token to pad batches with")
    bos = tokenizer.bos_token_id
    start = bos if isinstance(bos, int) else (eos_ids[0] if eos_ids else None)
    return pad, start, eos_ids


def _prompt_budget(
    model: PreTrainedModel, max_new_tokens: int, encoder_decoder: bool
) -> int | None:
    """How many prompt tokens fit before the new ones, or None when the model sets no limit."""
    context = getattr(model.config, "max_position_embeddings", None)
    if encoder_decoder or not isinstance(context, int):
        return None
    if max_new_tokens >= context:
        raise GenloopError(
            f"max_new_tokens ({max_new_tokens}) must be less than the model's context "
            f"length ({context})"
        )
    return context - max_new_tokens


def _pad(
    ids_list: list[list[int]], pad_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left (decoder-only) or the right."""
    width = max(len(ids) for ids in ids_list)
    input_ids = torch.full((len(ids_list), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), width), dtype=torch.long)
    for row, ids in enumerate(ids_list):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, cols] = torch.tensor(ids, dtype=torch.long)
        mask[row, cols] = 1
    return input_ids, mask


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    cut = min((i for s in stop or [] if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
