"""The request of ``POST /v1/embeddings`` (the response is built in ``serving.py``).

The input's size (how many inputs, how many tokens) is checked by the handler against the
server's limits (``serve.max_embedding_inputs``, ``serve.max_embedding_tokens``), so that
too much is a 413 naming them; an empty input is a 400 there too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenId = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]  # not true/false


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1, max_length=200, description="An embedding model from /v1/models."
    )
    input: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="A text, several texts, a token array or several token arrays (each is "
        "embedded on its own; none may be empty)."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float",
        description="float: lists of numbers; base64: each vector's little-endian float32 "
        "bytes, base64-encoded.",
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="Keep the first N dimensions, normalised again (up to the model's size).",
    )
    user: str | None = Field(
        None, min_length=1, max_length=128, description="The end user (for privacy, usage)."
    )
