"""The tokenizer side every text engine shares: prompt ids in, one token's text out.

The native engine and the managed vLLM engine both tokenize in genloop, with the model's
own tokenizer, so that prompt limits, chat templates and logprob texts are the same
whichever backend decodes. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from genloop.errors import GenloopError

MAX_CACHED_TOKEN_TEXTS = 1 << 20  # bounded: a vocabulary is far smaller


class PromptTokenizer:
    """Prompt token ids and per-token texts for one model's tokenizer."""

    def __init__(self, tokenizer: Any, *, model_name: str, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        # the tokenizer's own EOS, else the lowest of the model's end tokens
        self.eos_token_id: int | None = (
            tok_eos if isinstance(tok_eos, int) else min(eos_token_ids, default=None)
        )
        self._token_texts: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt; an empty one starts from the BOS (or EOS) token."""
        ids = list(self.tokenizer(text)["input_ids"])
        if not ids:
            start = getattr(self.tokenizer, "bos_token_id", None)
            start = start if start is not None else self.eos_token_id
            if start is None:
                raise GenloopError("an empty prompt needs a BOS or EOS token; this model has none")
            ids = [int(start)]
        return ids

    def chat_prompt_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt of a chat: the tokenizer's chat template, ending with the assistant's
        turn; ``tools`` (OpenAI's function specs) go to a template that renders them."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenloopError(
                f"model {self.model_name} has no chat template in its tokenizer, so it cannot "
                "take chat messages; use /v1/completions with a plain prompt, or train it with "
                "a tokenizer that has one (genloop's own tokenizers do)"
            )
        try:
            extra = {"tools": tools} if tools else {}
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
            )
        except Exception as exc:  # jinja raises its own errors for messages it cannot render
            raise GenloopError(f"the chat template cannot render these messages: {exc}") from None
        if ids and isinstance(ids[0], list):  # some tokenizers return a batch of one
            ids = ids[0]
        return [int(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """One token's own text (for logprobs), decoded once and remembered."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._token_texts) < MAX_CACHED_TOKEN_TEXTS:
                self._token_texts[token_id] = text
        return text
