"""The request of ``POST /v1/chat/completions`` (the response is built in ``serving.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genloop.serve.api.protocol import SamplingFields

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1_000_000, description="The arguments, as JSON text.")
    parsed_arguments: Any = Field(None, description="Ignored (the openai client's parse()).")


class ToolCall(BaseModel):
    """A call an assistant message made (sent back in with the conversation)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="Text, or a list of text parts (null: an assistant's tool calls)."
    )
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(
        None, max_length=128, description="An assistant message's calls."
    )
    tool_call_id: str | None = Field(
        None, min_length=1, max_length=128, description="A tool message: the call it answers."
    )
    # what the openai client sends back when a parsed answer is appended to the messages
    # as it came (its own examples do): accepted, and ignored
    refusal: str | None = Field(None, description="Ignored.")
    parsed: Any = Field(None, description="Ignored (the openai client's parse()).")
    annotations: list[Any] | None = Field(None, description="Ignored.")
    audio: Any = Field(None, description="Ignored.")
    function_call: Any = Field(None, description="Ignored (the deprecated function call).")

    @model_validator(mode="after")
    def _fits_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of the arguments object (none: no arguments)."
    )
    strict: bool | None = Field(None, description="Always enforced (by a grammar).")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(
        None, ge=1, le=1_000_000, description="Tokens to generate at most (default: as fits)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Same.")
    logprobs: bool = Field(False, description="Return the chosen tokens' log-probabilities.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: top k too.")
    tools: list[Tool] | None = Field(
        None, max_length=128, description="Functions the model may call (hermes-style calls)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or one function."
    )
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most one call per answer (default: several allowed)."
    )
