"""The request of ``POST /v1/chat/completions`` (the response is built in ``serving.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from genloop.serve.api.protocol import SamplingFields


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="Only plain text is supported.")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(
        None, ge=1, le=1_000_000, description="Tokens to generate at most (default: as fits)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Same.")
    logprobs: bool = Field(False, description="Return the chosen tokens' log-probabilities.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: top k too.")
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported.")
    tool_choice: Literal["none"] | None = Field(None, description="Not supported.")
