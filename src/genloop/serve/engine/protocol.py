"""The engine interface: what the endpoint handlers and the batch runner need of a backend.

A text backend is one loaded model version that decodes many requests together. Callers
tokenize with it (``encode``, ``chat_prompt_ids``), hand it a
:class:`~genloop.serve.engine.types.GenerationRequest` and read the async iterator
``submit`` returns: :class:`~genloop.serve.engine.types.TokenDelta` s, then one
:class:`~genloop.serve.engine.types.Finished`. Closing that iterator (``aclose()``, or the
task reading it being cancelled, as when a client disconnects) cancels the request.

``loader.load_engine`` is the one place that picks the backend for a model directory: the
native batched engine (``engine.Engine``) over the native decoder runner, the generic Hugging
Face runner or, for an ONNX variant, the onnxruntime runner. A managed vLLM process fits
behind the same interface as one more backend (prompt token ids in through its
``/v1/completions``, its streamed tokens out as events), so the gateway in front of it —
keys, limits, guardrails, request logs, usage, feedback ids, hot swap, drain — stays the
same. Upstream servers (``serve/upstream.py``) are routed to before any of this: their
model may not be here to tokenize with, so the request goes on as it came, OpenAI-shaped.

Nothing here imports torch: handlers and tests use these types without a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from genloop.serve.engine.captioner import Caption
    from genloop.serve.engine.types import EngineStats, Event, GenerationRequest


@runtime_checkable
class TextEngine(Protocol):
    """One loaded text model version, decoding many requests together."""

    model_name: str
    model_version: int | None
    tokenizer: Any  # a transformers tokenizer (len(), decode(), bos_token_id)
    context_length: int  # the longest prompt + completion a request may have
    vocab_size: int

    async def start(self) -> None:
        """Get ready to decode (load, warm up); returns once the first request would not wait."""
        ...

    def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Queue ``request``; raises ``EngineBusy`` (429) or ``EngineStopped`` (503)."""
        ...

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; let running requests finish, abort what is left at the deadline."""
        ...

    def stats(self) -> EngineStats: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt (an empty one starts from BOS)."""
        ...

    def chat_prompt_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt of a chat, through the tokenizer's chat template (with ``tools`` for
        a template that renders them)."""
        ...

    def prepare_grammar(self, grammar: str) -> None:
        """Get ``grammar`` (``GenerationRequest.grammar``: llguidance's Lark dialect) ready
        for this model, or raise a GenloopError (400) saying why it cannot be followed.
        May take milliseconds: callers run it off the event loop."""
        ...

    def token_text(self, token_id: int) -> str:
        """One token's own text (for logprobs)."""
        ...


class ImageGenerator(Protocol):
    """One loaded image model version (``genloop.models.image_generation``): a class- or
    text-conditioned generator. The text-to-image options are refused, by name, by models
    that cannot use them."""

    def prompt_warnings(self, prompt: str) -> list[str]:
        """What to tell the client about its prompt (one cut to the text encoder's context)."""
        ...

    def generate(
        self,
        prompt: str,
        n: int,
        seed: int | None,
        *,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> list[Image]: ...


class ImageCaptioner(Protocol):
    """One loaded captioning model version (``captioner.Captioner``): images in through
    the chat endpoint's image parts, one caption each."""

    image_size: int  # the side the encoder reads (images are resized to it)
    image_tokens: int  # encoder positions one image fills (counted as prompt tokens)
    max_new_tokens: int  # the longest caption the decoder's positions allow

    def caption(
        self, images_uint8: torch.Tensor, max_new_tokens: int, num_beams: int = 1
    ) -> list[Caption]:
        """One caption per image of ``images_uint8`` (N, C, H, W); blocking."""
        ...
