"""Training examples from pairs rows: chat tokenization, loss masks, padding.

SFT and DPO train on rows of a pairs dataset (``genloop.data.pairs``). A row becomes an
:class:`Example`: its token ids and, for each position, the label to predict there or -100
(no loss). A prompt/response or messages row goes through the tokenizer's chat template
and trains on the assistant's tokens only; a ``"format": "completion"`` row is plain text,
the response's tokens right after the prompt's. :func:`collate` pads examples into a batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from genloop.errors import GenloopError

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # genloop.models.token_loss.IGNORE_INDEX, without importing torch here
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class Example:
    """One tokenized example; ``labels`` is -100 where there is no loss.

    Causal LM: ``labels`` lines up with ``input_ids`` (the shift happens in the loss).
    Seq2seq: ``input_ids`` is the encoder's input, ``labels`` the decoder's target.
    """

    input_ids: list[int]
    labels: list[int]


def row_messages(row: Mapping[str, Any], response_key: str = "response") -> list[dict[str, str]]:
    """The conversation of a row: its messages, or the prompt as the user's turn and the
    response (``response_key``) as the assistant's."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row[response_key]},
    ]


def chat_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """The ids of ``messages`` through the chat template, and a 0/1 mask of the assistant's
    tokens (what SFT trains on).

    A template that marks assistant turns with ``{% generation %}`` (genloop's does) gives
    the mask directly. For one without the marks, the mask is what the whole conversation
    adds to the earlier turns with the generation prompt: the last assistant turn.
    """
    template = tokenizer.chat_template
    if not template:
        raise GenloopError(
            "the tokenizer has no chat template; set chat_template in its "
            "tokenizer_config.json (genloop's own tokenizers have one)"
        )
    if _GENERATION_TAG.search(str(template)):
        out: Any = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])
    if messages[-1]["role"] != "assistant":
        raise GenloopError(
            "the chat template does not mark assistant turns with {% generation %}, so only a "
            "conversation that ends with the assistant's turn can be trained on"
        )
    prompt: Any = tokenizer.apply_chat_template(
        messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True
    )
    full: Any = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    prompt_ids, ids = list(prompt["input_ids"]), list(full["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise GenloopError(
            "cannot tell the response from the prompt: the chat template renders the earlier "
            "turns differently once the answer follows; mark assistant turns with "
            "{% generation %} … {% endgeneration %} in the template"
        )
    return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


def completion_tokens(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str
) -> tuple[list[int], list[int]]:
    """The ids of ``prompt`` + ``response`` as plain text (no template), and a 0/1 mask of
    the response's tokens. No end of text follows: a completion continues text, and where
    it stops is the caller's (``max_tokens``, stop strings). An empty prompt is the end of
    text (what a packed document follows in pretraining, and what generation starts from)."""
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise GenloopError("the tokenizer has no eos token to start an empty prompt from")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    prompt_ids = prompt_ids or [eos]
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def _masked(ids: list[int], mask: list[int], max_len: int) -> Example | None:
    """The example truncated to ``max_len`` tokens; None when no response token is left to
    predict (position 0 predicts nothing)."""
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        return None
    return Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])


def sft_example(
    tokenizer: PreTrainedTokenizerBase,
    row: Mapping[str, Any],
    max_len: int,
    *,
    encoder_decoder: bool = False,
) -> Example | None:
    """The SFT example of a row, truncated to ``max_len``; None if no response is left.

    Causal LM: the conversation through the chat template, labels on the assistant's tokens.
    Seq2seq: the prompt (plain text, or the earlier turns through the chat template) + eos
    for the encoder, the response + eos as labels.
    """
    if not encoder_decoder:
        if row.get("format") == "completion":
            return _masked(*completion_tokens(tokenizer, row["prompt"], row["response"]), max_len)
        return _masked(*chat_tokens(tokenizer, row_messages(row)), max_len)
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise GenloopError("the tokenizer has no eos token to end seq2seq inputs and outputs")
    if "messages" in row:
        messages = row_messages(row)
        if messages[-1]["role"] != "assistant":
            raise GenloopError("a seq2seq SFT conversation must end with the assistant's turn")
        rendered: Any = tokenizer.apply_chat_template(
            messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True
        )
        source, target = list(rendered["input_ids"]), messages[-1]["content"]
    else:
        source = [*tokenizer(row["prompt"], add_special_tokens=False)["input_ids"], eos]
        target = row["response"]
    labels = [*tokenizer(target, add_special_tokens=False)["input_ids"], eos]
    return Example(source[:max_len], labels[:max_len])


def dpo_example(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], max_len: int
) -> tuple[Example, Example] | None:
    """(chosen, rejected) examples of a DPO row; None if either loses its response to
    truncation."""
    if row.get("format") == "completion":
        chosen = _masked(*completion_tokens(tokenizer, row["prompt"], row["chosen"]), max_len)
        rejected = _masked(*completion_tokens(tokenizer, row["prompt"], row["rejected"]), max_len)
    else:
        chosen = _masked(*chat_tokens(tokenizer, row_messages(row, "chosen")), max_len)
        rejected = _masked(*chat_tokens(tokenizer, row_messages(row, "rejected")), max_len)
    return None if chosen is None or rejected is None else (chosen, rejected)


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Right-pad to the longest: ``input_ids`` with ``pad_id``, ``attention_mask`` 0 on
    padding, ``labels`` -100 on padding (their own length for seq2seq)."""
    import torch

    def pad(rows: list[list[int]], value: int) -> Tensor:
        out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(device)

    return {
        "input_ids": pad([e.input_ids for e in examples], pad_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
        "labels": pad([e.labels for e in examples], IGNORE_INDEX),
    }
