"""Chat with a captioning model: the last user message's images in, their captions out.

A ``vision`` model version (``serve/models.py``: the ``captioning`` family) answers
``/v1/chat/completions`` when the conversation's last user message carries OpenAI image
parts (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}}``):

- every image part of the request is decoded and checked (``api/image_parts.py``, with the
  limits of ``serve.image_inputs``: 413 for too large, 400 for undecodable, remote URLs
  refused unless allowed); the last user message's images are captioned, in order;
- one choice: one caption per image, joined by newlines. ``n`` must be 1: captioning is
  greedy (or beam search with ``num_beams``), so more choices would repeat it;
- ``max_tokens`` (or ``max_completion_tokens``) bounds each caption, as the decoder's
  positions do; ``finish_reason`` is ``length`` when a caption was cut, else ``stop``;
- ``temperature`` must be unset or 0 (a caption is never sampled); ``top_p``, ``top_k``
  and ``seed``, which only act when sampling, are accepted and change nothing; the text
  parts are logged but not read (the model takes no text prompt); ``stop``, ``tools``,
  ``response_format``, ``logprobs`` and the penalties are refused by name;
- usage: the encoder positions the images fill as ``prompt_tokens`` and the generated
  tokens (eos included) as ``completion_tokens``;
- ``stream: true``: the caption, once made, as the text models' chunks (a role chunk, one
  content chunk, a chunk with ``finish_reason``, the usage chunk when
  ``stream_options.include_usage``, then ``[DONE]``).

One caption runs at a time per model version (``LoadedModel.run_exclusive``: queue bound →
429, ``serve.request_timeout_s`` → 504). The request log keeps the messages' text with each
image as ``[image]``, never the image bytes; the response's id takes feedback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from starlette.responses import JSONResponse, Response

from genloop.serve.api.image_parts import ImageLimits, parse_messages, to_uint8
from genloop.serve.api.protocol import new_id
from genloop.serve.api.serving_text import log_params, user_of
from genloop.serve.api.streaming import (
    CLIENT_CLOSED,
    SSE_DONE,
    EventStream,
    sse,
    until_disconnected,
)
from genloop.serve.errors import error_type, invalid

if TYPE_CHECKING:
    from starlette.requests import Request

    from genloop.config import ImageInputsConfig, ServeConfig
    from genloop.security.keys import Principal
    from genloop.serve.api.chat.protocol import ChatRequest
    from genloop.serve.engine.captioner import Caption
    from genloop.serve.engine.protocol import ImageCaptioner
    from genloop.serve.models import LoadedModel
    from genloop.serve.state import ServerState

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """The captions of one request, as one choice."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


def image_limits(cfg: ImageInputsConfig) -> ImageLimits:
    return ImageLimits(
        max_bytes=cfg.max_bytes,
        max_pixels=cfg.max_pixels,
        max_images=cfg.max_images,
        allow_remote=cfg.allow_remote,
        allow_private=cfg.allow_private_hosts,
        timeout_s=cfg.fetch_timeout_s,
    )


def check_vision_request(body: ChatRequest) -> None:
    """What a captioning model cannot do, refused by the field's name (module docstring)."""
    refused = {
        "stop": bool(body.stop),
        "tools": bool(body.tools),
        "tool_choice": body.tool_choice not in (None, "none"),
        "response_format": body.response_format is not None and body.response_format.type != "text",
        "logprobs": body.logprobs,
        "top_logprobs": body.top_logprobs is not None,
        "presence_penalty": bool(body.presence_penalty),
        "frequency_penalty": bool(body.frequency_penalty),
        "logit_bias": bool(body.logit_bias),
    }
    for name, given in refused.items():
        if given:
            raise invalid(f"{name} is not supported by captioning models", name)
    if body.n != 1:
        raise invalid(
            "a captioning model gives one caption per image (by greedy or beam search): "
            "n must be 1",
            "n",
        )
    if body.temperature:
        raise invalid(
            "captions are not sampled (greedy, or beam search with num_beams): leave "
            "temperature unset or 0",
            "temperature",
        )
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options needs stream: true", "stream_options")
    both = body.max_tokens is not None and body.max_completion_tokens is not None
    if both and body.max_tokens != body.max_completion_tokens:
        raise invalid("give max_tokens or max_completion_tokens, not both", "max_tokens")


def caption_budget(body: ChatRequest, captioner: ImageCaptioner, cfg: ServeConfig) -> int:
    """Tokens each caption may have: the request's (within ``serve.max_tokens``), else as
    many as the server allows; the decoder's positions bound it either way."""
    wanted = body.max_completion_tokens or body.max_tokens
    if wanted is not None and wanted > cfg.max_tokens:
        raise invalid(
            f"max_tokens is {wanted}; this server allows at most {cfg.max_tokens}", "max_tokens"
        )
    return min(wanted or cfg.max_tokens, captioner.max_new_tokens)


def last_user_images(body: ChatRequest, served: str) -> int:
    """The index of the last user message, which must carry images (a 400 if not)."""
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if not users or not body.messages[users[-1]].image_parts():
        where = f"messages[{users[-1]}].content" if users else "messages"
        raise invalid(
            f"model {served} captions images: the last user message needs an image_url part "
            "(data:image/png;base64,…)",
            where,
        )
    return users[-1]


async def serve_vision_chat(
    state: ServerState, request: Request, body: ChatRequest, principal: Principal
) -> Response:
    """Caption the last user message's images (module docstring)."""
    check_vision_request(body)
    cfg = state.cfg.serve
    flags = state.check_input("\n".join(m.text() for m in body.messages if m.role != "assistant"))
    started = time.monotonic()
    created = int(time.time())
    response_id = new_id("chatcmpl")
    loaded = await state.models.acquire(body.model)
    status, answer = 500, None
    reservation = None
    try:
        captioner = loaded.image_captioner()
        last = last_user_images(body, loaded.served)
        max_new_tokens = caption_budget(body, captioner, cfg)
        limits = image_limits(cfg.image_inputs)
        # decoding (and fetching, where allowed) blocks: off the event loop
        parsed = await asyncio.to_thread(parse_messages, body.messages, limits)
        pixels = to_uint8(parsed[last].images, captioner.image_size)  # (N, 3, S, S) uint8
        prompt_tokens = captioner.image_tokens * pixels.shape[0]
        # reserve the most it can use (a caption per image); _record settles to the use
        reservation = await state.check_rate(
            principal, tokens=prompt_tokens + max_new_tokens * int(pixels.shape[0])
        )

        def call() -> list[Caption]:
            return captioner.caption(pixels, max_new_tokens, body.num_beams)

        work = loaded.run_exclusive(
            call, max_queue=cfg.max_queue, timeout_s=cfg.request_timeout_s, what="captioning"
        )
        captions = await until_disconnected(request, work)
        if captions is None:
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        answer = _answer(state, captions, prompt_tokens, flags)
        status = 200
    except Exception as exc:
        status = int(getattr(exc, "http_status", 500))
        state.metrics.error(loaded.info.name, error_type(exc), loaded.info.version)
        raise
    finally:
        state.models.release(loaded)
        try:
            await _record(
                state, loaded, body, principal, response_id, status, answer, flags, started
            )
            with anyio.CancelScope(shield=True):
                used = answer.prompt_tokens + answer.completion_tokens if answer else 0
                await state.settle(reservation, used)
        except Exception:
            log.exception("could not record request %s", response_id)
    assert answer is not None
    envelope = {
        "id": response_id,
        "created": created,
        "model": loaded.ref,
        "system_fingerprint": loaded.ref,
    }
    headers = {"X-Request-Id": response_id}
    if body.stream:
        response: Response = _stream(envelope, answer, body)
        response.headers.update(headers)
        return response
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": answer.text},
        "logprobs": None,
        "finish_reason": answer.finish_reason,
    }
    content = envelope | {"object": "chat.completion", "choices": [choice], "usage": answer.usage()}
    return JSONResponse(content, headers=headers)


def _answer(
    state: ServerState, captions: list[Caption], prompt_tokens: int, flags: list[str]
) -> Answer:
    """The captions as one answer, through the output guardrails."""
    text = "\n".join(c.text for c in captions)
    cut = any(c.finish_reason == "length" for c in captions)
    finish = "length" if cut else "stop"
    if state.cfg.security.guardrails.blocklist_output:
        verdict = state.guardrails.check_output(text)
        flags += verdict.flags
        if verdict.refused:
            text, finish = "", "content_filter"
    completion = sum(c.completion_tokens for c in captions)
    return Answer(text, finish, prompt_tokens, completion)


def _stream(envelope: dict[str, Any], answer: Answer, body: ChatRequest) -> EventStream:
    """The finished answer in the text models' chunks (module docstring)."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = envelope | {"object": "chat.completion.chunk"}
    if include_usage:
        chunk["usage"] = None

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return chunk | {
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        }

    events = [
        choice({"role": "assistant", "content": ""}),
        choice({"content": answer.text}),
        choice({}, answer.finish_reason),
    ]
    if include_usage:
        events.append(chunk | {"choices": [], "usage": answer.usage()})

    async def content() -> AsyncIterator[bytes]:
        for event in events:
            yield sse(event)
        yield SSE_DONE

    async def nothing() -> None:
        return None

    return EventStream(content(), nothing)


async def _record(
    state: ServerState,
    loaded: LoadedModel,
    body: ChatRequest,
    principal: Principal,
    response_id: str,
    status: int,
    answer: Answer | None,
    flags: list[str],
    started: float,
) -> None:
    """Request row (text only: images as ``[image]``), usage and metrics.
    Rate-limited requests (429) are counted, never written to the catalog."""
    from genloop.monitor.usage import RequestRecord

    e2e = time.monotonic() - started
    info = loaded.info
    finish = answer.finish_reason if answer else None
    prompt_tokens = answer.prompt_tokens if answer else 0
    completion = answer.completion_tokens if answer else 0
    state.metrics.request_finished(
        info.name, info.version, status, finish, prompt_tokens, completion, e2e
    )
    if status == 429:
        return
    messages = [{"role": m.role, "content": m.log_text()} for m in body.messages]
    state.recorder.submit(
        RequestRecord(
            request_id=response_id,
            endpoint="chat.completions",
            model_name=info.name,
            model_version=info.version,
            api_key_id=principal.key_id,
            key_prefix=principal.prefix,
            user_id=user_of(body, principal),
            prompt=json.dumps(messages, ensure_ascii=False) if answer else "",
            response=answer.text if answer else "",
            params=log_params(body, exclude={"messages"}),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            latency_ms=e2e * 1000.0,
            status=status,
            flags=list(dict.fromkeys(flags)),
            finish_reason=finish,
        )
    )
