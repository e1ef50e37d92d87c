"""The request of ``POST /v1/chat/completions`` (the response is built in ``serving.py``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genloop.serve.api.protocol import SamplingFields

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


IMAGE_PLACEHOLDER = "[image]"  # an image part in the request log (never its bytes)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        min_length=1,
        description="A data: URI (data:image/png;base64,…); http(s) only where the server "
        "allows remote images (serve.image_inputs.allow_remote).",
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted; the model reads every image at its own size."
    )


class ImagePart(BaseModel):
    """An image for a captioning model (``api/image_parts.py`` decodes it)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


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
    content: str | list[ContentPart] | None = Field(
        None,
        description="Text, or a list of text and image parts (images: user messages, to "
        "captioning models; null: an assistant's tool calls).",
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
        if self.role != "user" and self.image_parts():
            raise ValueError("only user messages may carry image parts")
        return self

    def text(self) -> str:
        """The text parts joined (image parts left out)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_parts(self) -> list[int]:
        """The indices of the image parts in ``content``."""
        if not isinstance(self.content, list):
            return []
        return [j for j, p in enumerate(self.content) if isinstance(p, ImagePart)]

    def log_text(self) -> str:
        """The text as the request log keeps it: each image part as ``[image]``."""
        if not isinstance(self.content, list):
            return self.text()
        parts = self.content
        return "".join(p.text if isinstance(p, TextPart) else IMAGE_PLACEHOLDER for p in parts)


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
