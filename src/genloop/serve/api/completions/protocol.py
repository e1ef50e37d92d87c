"""The request of ``POST /v1/completions`` (the response is built in ``serving.py``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from genloop.serve.api.protocol import SamplingFields

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=128)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=128)]
    ) = Field(description="A string, several strings, or token ids (one or several prompts).")
    max_tokens: int | None = Field(
        16,
        ge=0,
        le=1_000_000,
        description="Tokens to generate at most (default 16); 0 with echo and logprobs only "
        "scores the prompt.",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Log-probabilities of the chosen and top-k tokens; with echo, of the "
        "prompt's tokens too (the first is null).",
    )
    echo: bool = Field(False, description="Put the prompt before the completion.")
    best_of: int | None = Field(None, ge=1, le=128, description="Only equal to n is supported.")
    suffix: str | None = Field(None, max_length=0, description="Not supported.")
