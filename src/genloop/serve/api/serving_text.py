"""The flow ``/v1/completions`` and ``/v1/chat/completions`` share, and their request checks.

Each of the two families supplies a :class:`TextHandler` (``completions/serving.py``,
``chat/serving.py``): one validated request that knows how to tokenize itself on the
model version it is served by and how its choices look in OpenAI's shape. :func:`serve_text`
does the rest, the same for both:

1. route: a model served by upstream servers only goes there as it came
   (``serve/upstream.py``); anything else is served here;
2. lease the version the model name resolves to now (``serve/models.py``: hot swap);
3. build the job (the handler tokenizes and checks the budget), charge the prompt to the
   key's token budget, submit every choice to the engine (``text_run.TextRun``);
4. answer: one JSON body, or server-sent events as tokens come (``stream: true``);
5. record it (request row, usage, metrics) and release the lease, however it ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from genloop.errors import GenloopError
from genloop.serve.api.protocol import SamplingFields, new_id
from genloop.serve.api.streaming import (
    CLIENT_CLOSED,
    SSE_DONE,
    EventStream,
    json_bytes,
    sse,
    until_disconnected,
)
from genloop.serve.api.text_run import TextRun
from genloop.serve.engine.types import SamplingParams
from genloop.serve.errors import error_body, error_type, invalid

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from genloop.security.keys import Principal
    from genloop.serve.api.text_run import ChoiceResult, Piece, TextJob
    from genloop.serve.models import LoadedModel
    from genloop.serve.state import ServerState

log = logging.getLogger(__name__)

MAX_STOP_CHARS = 256


class TextHandler(Protocol):
    """One validated request of a text endpoint family: what differs between them."""

    endpoint: str  # "completions" | "chat.completions" (the request log's name)
    response_object: str  # OpenAI's object name of the whole response
    chunk_object: str  # ... and of one streamed chunk

    @property
    def body(self) -> SamplingFields: ...

    async def build(self, loaded: LoadedModel) -> TextJob:
        """Tokenize on the leased version, check the budget: the job for the engine."""
        ...

    def choice(self, run: TextRun, result: ChoiceResult) -> dict[str, Any]:
        """One finished choice, as the whole (non-streamed) response lists it."""
        ...

    def head(self, run: TextRun) -> list[dict[str, Any]]:
        """The choices of the chunks streamed before the first token (one chunk each)."""
        ...

    def delta(self, run: TextRun, piece: Piece) -> dict[str, Any] | None:
        """The choice of the chunk that streams one piece (a token, or a choice's end);
        None: nothing to send for it yet (text held back, as a possible tool call's tag)."""
        ...


async def serve_text(
    state: ServerState, request: Request, principal: Principal, handler: TextHandler
) -> Response:
    """Route, lease, build, admit, generate, answer (module docstring)."""
    body = handler.body
    if state.upstreams.has(body.model) and not state.models.has(body.model):
        return await _proxy(state, request, body, "/" + handler.endpoint.replace(".", "/"))
    loaded = await state.models.acquire(body.model)
    job: TextJob | None = None
    try:
        job = await handler.build(loaded)
        # reserve the most the request can use; TextRun.finish settles to what it used
        job.reservation = await state.check_rate(
            principal, tokens=job.prompt_tokens + job.choices * job.params.max_tokens
        )
        run = TextRun(state, job)
        await run.submit()
    except BaseException as exc:
        state.models.release(loaded)
        if job is not None and job.reservation is not None:
            with anyio.CancelScope(shield=True):
                await state.settle(job.reservation, 0)
        if isinstance(exc, Exception):
            _failed(state, loaded, exc, handler, principal)
        raise
    headers = {"X-Request-Id": job.response_id}
    if body.stream:
        response = _stream(run, handler, on_close=lambda: state.models.release(loaded))
        response.headers.update(headers)
        return response
    status, kind = 500, "internal"
    try:
        results = await until_disconnected(request, run.collect())
        if results is None:
            status, kind = CLIENT_CLOSED, "disconnected"
            return Response(status_code=CLIENT_CLOSED)
        status, kind = 200, ""
        return JSONResponse(_response(run, handler, results), headers=headers)
    except Exception as exc:
        status = int(getattr(exc, "http_status", 500))
        kind = error_type(exc)
        raise
    finally:
        await run.close()
        await run.finish(status, kind or None)
        state.models.release(loaded)


def _response(run: TextRun, handler: TextHandler, results: list[ChoiceResult]) -> dict[str, Any]:
    return {
        "id": run.job.response_id,
        "object": handler.response_object,
        "created": run.job.created,
        "model": run.job.loaded.ref,
        "system_fingerprint": run.job.loaded.ref,
        "choices": [handler.choice(run, r) for r in results],
        "usage": run.usage(),
    }


def _chunk(run: TextRun, handler: TextHandler, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """The envelope of one streamed chunk; ``usage`` is null in every chunk but the last
    when the client asked for it (``stream_options.include_usage``)."""
    out: dict[str, Any] = {
        "id": run.job.response_id,
        "object": handler.chunk_object,
        "created": run.job.created,
        "model": run.job.loaded.ref,
        "system_fingerprint": run.job.loaded.ref,
        "choices": choices,
    }
    if _include_usage(handler.body):
        out["usage"] = None
    return out


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _stream(run: TextRun, handler: TextHandler, *, on_close: Callable[[], None]) -> EventStream:
    """The SSE response of a submitted run: the head chunks, one chunk per piece, the
    usage chunk (``stream_options.include_usage``), then ``[DONE]``. An error after the
    first byte is sent as an ``{"error": ...}`` event (the status line is gone by then)."""
    head = [_chunk(run, handler, [choice]) for choice in handler.head(run)]
    include_usage = _include_usage(handler.body)
    outcome: dict[str, Any] = {"status": CLIENT_CLOSED, "error": "disconnected"}
    # Every token's chunk is the same envelope around one choice: encode the envelope
    # once, then each chunk costs one small json.dumps (the event loop, and with it the
    # GIL the engine thread needs, does this once per token of every stream).
    before, after = sse(_chunk(run, handler, [{}])).split(b'"choices":[{}]')
    before += b'"choices":['
    after = b"]" + after

    async def events() -> AsyncIterator[bytes]:
        try:
            for c in head:
                yield sse(c)
            async for piece in run.pieces():
                choice = handler.delta(run, piece)
                if choice is not None:
                    yield before + json_bytes(choice) + after
            if include_usage:
                yield sse(_chunk(run, handler, []) | {"usage": run.usage()})
            outcome.update(status=200, error=None)
            yield SSE_DONE
        except GenloopError as exc:
            status = int(getattr(exc, "http_status", 400))
            outcome.update(status=status, error=error_type(exc))
            body = error_body(
                status, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None)
            )
            yield sse(body)
            yield SSE_DONE
        except Exception:
            log.exception("stream %s failed", run.job.response_id)
            outcome.update(status=500, error="internal")
            yield sse(error_body(500, "internal server error", code="internal_error"))
            yield SSE_DONE

    async def close() -> None:
        try:
            await run.close()
            await run.finish(outcome["status"], outcome["error"])
        finally:
            on_close()

    return EventStream(events(), close)


async def _proxy(state: ServerState, request: Request, body: BaseModel, path: str) -> Response:
    """Send the request to the model's upstream servers (failover inside).

    The upstream records the request (usage, request log) itself: replicas share the
    catalog, and counting it here too would count it twice. Metrics count it here.
    """
    payload = body.model_dump(exclude_unset=True, by_alias=True)  # json_schema's "schema"
    model = payload["model"]
    started = time.monotonic()
    status = 503
    try:
        response = await state.upstreams.forward(model, path, payload, dict(request.headers))
        status = response.status_code
        return response
    finally:
        state.metrics.request_finished(model, None, status, None, 0, 0, time.monotonic() - started)
        if status >= 400:
            state.metrics.error(model, "upstream" if status >= 500 else "invalid_request")


def _failed(
    state: ServerState,
    loaded: LoadedModel,
    exc: Exception,
    handler: TextHandler,
    principal: Principal,
) -> None:
    """Count and log a request refused before it reached the engine.

    Rate-limited ones (429) are counted but not written to the catalog: a client hammering
    a full budget must not turn into database writes.
    """
    from genloop.monitor.usage import RequestRecord

    info = loaded.info
    status = int(getattr(exc, "http_status", 500))
    try:
        state.metrics.error(info.name, error_type(exc), info.version)
        state.metrics.request_finished(info.name, info.version, status, None, 0, 0, 0.0)
        if status != 429:
            state.recorder.submit(
                RequestRecord(
                    request_id=new_id("err"),
                    endpoint=handler.endpoint,
                    model_name=info.name,
                    model_version=info.version,
                    api_key_id=principal.key_id,
                    key_prefix=principal.prefix,
                    user_id=user_of(handler.body, principal),
                    status=status,
                )
            )
    except Exception:
        log.exception("could not record a failed request")


# ---------------------------------------------------------------------- request checks


def check_request(body: SamplingFields, state: ServerState, choices: int) -> None:
    """The server's limits and the fields accepted but not supported."""
    cfg = state.cfg.serve
    if choices > cfg.max_n:
        what = "n × prompts" if choices != body.n else "n"
        raise invalid(f"{what} is {choices}; this server allows at most {cfg.max_n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise invalid(f"{name} is not supported (leave it unset or 0)", name)
    if body.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias")
    if body.num_beams > 1:
        if body.stream:
            raise invalid(
                "beam search (num_beams > 1) is not streamed; set stream: false", "stream"
            )
        if body.n > 1:
            raise invalid("beam search returns one sequence: use n = 1 with num_beams", "n")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options needs stream: true", "stream_options")
    fmt = body.response_format
    if body.num_beams > 1 and fmt is not None and fmt.type != "text":
        raise invalid("beam search (num_beams > 1) cannot follow a response_format", "num_beams")


def stop_list(stop: str | list[str] | None, max_stop: int) -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > max_stop:
        raise invalid(f"at most {max_stop} stop sequences are allowed", "stop")
    for s in items:
        if not s:
            raise invalid("stop sequences must not be empty", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise invalid(f"stop sequences may be at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(dict.fromkeys(items))


def check_prompt_len(prompt_len: int, state: ServerState, param: str) -> None:
    limit = state.cfg.serve.max_prompt_tokens
    if prompt_len > limit:
        raise invalid(
            f"the prompt is {prompt_len} tokens; this server allows at most {limit}",
            param,
            "context_length_exceeded",
        )


def check_max_tokens(
    max_tokens: int | None, prompt_len: int, loaded: LoadedModel, state: ServerState, param: str
) -> int:
    """The generation budget: the request's, else as much as fits (within serve.max_tokens)."""
    cfg = state.cfg.serve
    context = loaded.text_engine().context_length
    room = context - prompt_len if context else cfg.max_tokens
    if max_tokens is None:
        if room < 1:
            raise invalid(
                f"the prompt ({prompt_len} tokens) fills the model's context of {context}",
                param,
                "context_length_exceeded",
            )
        return min(cfg.max_tokens, room)
    if max_tokens > cfg.max_tokens:
        raise invalid(
            f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens}",
            "max_tokens",
        )
    if context and prompt_len + max_tokens > context:
        raise invalid(
            f"this model's context is {context} tokens; the request needs "
            f"{prompt_len + max_tokens} "
            f"({prompt_len} in the prompt, {max_tokens} to generate)",
            param,
            "context_length_exceeded",
        )
    return max_tokens


def sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int,
    stop: tuple[str, ...],
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=stop,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        num_beams=body.num_beams,
    )


async def prepare_grammar(loaded: LoadedModel, grammar: str | None, param: str) -> None:
    """Get a request's grammar ready on the engine that will follow it (compiled for the
    native engine, checked for vLLM), off the event loop; a 400 naming ``param`` if not."""
    if grammar is None:
        return
    engine = loaded.text_engine()
    try:
        await asyncio.to_thread(engine.prepare_grammar, grammar)
    except GenloopError as exc:
        raise invalid(str(exc), param) from None


def log_params(body: BaseModel, *, exclude: set[str]) -> dict[str, Any]:
    """The request's settings for the request log (never its text)."""
    return body.model_dump(exclude=exclude | {"user"}, exclude_none=True, by_alias=True)


def user_of(body: SamplingFields, principal: Principal) -> str | None:
    return body.user or principal.user_id
