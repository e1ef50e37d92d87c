"""What the endpoint families' protocol models share: the sampling fields of the text
endpoints (OpenAI's, plus ``top_k`` and ``num_beams``), ``response_format``, seed bounds,
response ids."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def new_id(prefix: str) -> str:
    """A response id (``cmpl-…``, ``chatcmpl-…``, ``img-…``): what feedback refers to."""
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with the usage.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The format's name.")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="A JSON schema the output must conform to."
    )
    strict: bool | None = Field(None, description="Always enforced (by a grammar).")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """The sampling fields both endpoints take (OpenAI's, plus top_k and num_beams)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="A model id from /v1/models.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling. Default 1.")
    top_k: int | None = Field(None, ge=1, le=100_000, description="Sample from the k likeliest.")
    n: int = Field(1, ge=1, le=128, description="Choices to generate (at most serve.max_n).")
    stream: bool = Field(False, description="Send server-sent events as tokens come.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description="Up to serve.max_stop strings that end generation (not included)."
    )
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="Same seed, prompt and settings: same output."
    )
    user: str | None = Field(
        None, min_length=1, max_length=128, description="The end user (for feedback, privacy)."
    )
    num_beams: int = Field(1, ge=1, le=16, description="> 1: beam search (not streamed).")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (leave unset).")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the output is JSON (a grammar holds it)."
    )
