"""What the completions and chat endpoints share: request fields, limits, routing."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from genloop.serve.engine.types import SamplingParams
from genloop.serve.errors import ApiError, invalid
from genloop.serve.generation import (
    TextJob,
    TextRun,
    error_type,
    stream_run,
    until_disconnected,
)

if TYPE_CHECKING:
    from genloop.security.keys import Principal
    from genloop.serve.generation import ChoiceResult, Piece
    from genloop.serve.models import LoadedModel
    from genloop.serve.state import ServerState

log = logging.getLogger(__name__)

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with the usage.")


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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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


def chunk_base(
    run: TextRun, obj: str, choices: list[dict[str, Any]], body: SamplingFields
) -> dict[str, Any]:
    """The envelope of one streamed chunk (``obj``: its OpenAI object name); ``usage`` is
    null in every chunk but the last when the client asked for it (``include_usage``)."""
    out: dict[str, Any] = {
        "id": run.job.response_id,
        "object": obj,
        "created": run.job.created,
        "model": run.job.loaded.ref,
        "system_fingerprint": run.job.loaded.ref,
        "choices": choices,
    }
    if body.stream_options and body.stream_options.include_usage:
        out["usage"] = None
    return out


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


def check_max_tokens(
    max_tokens: int | None, prompt_len: int, loaded: LoadedModel, state: ServerState, param: str
) -> int:
    """The generation budget: the request's, else as much as fits (within serve.max_tokens)."""
    cfg = state.cfg.serve
    context = int(getattr(loaded.text_engine(), "context_length", 0) or 0)
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


def check_prompt_len(prompt_len: int, state: ServerState, param: str) -> None:
    limit = state.cfg.serve.max_prompt_tokens
    if prompt_len > limit:
        raise invalid(
            f"the prompt is {prompt_len} tokens; this server allows at most {limit}",
            param,
            "context_length_exceeded",
        )


def sampling_params(
    body: SamplingFields, *, max_tokens: int, stop: tuple[str, ...], logprobs: int | None
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=stop,
        logprobs=logprobs,
        num_beams=body.num_beams,
    )


def log_params(body: BaseModel, *, exclude: set[str]) -> dict[str, Any]:
    """The request's settings for the request log (never its text)."""
    return body.model_dump(exclude=exclude | {"user"}, exclude_none=True)


def check_input(state: ServerState, text: str) -> list[str]:
    """Input guardrails: flags to log, or a 400 when the config says refuse."""
    verdict = state.guardrails.check_input(text)
    if verdict.refused:
        raise ApiError(
            verdict.message or "the request was refused by the input guardrails",
            status=400,
            code="content_refused",
        )
    return list(verdict.flags)


def user_of(body: SamplingFields, principal: Principal) -> str | None:
    return body.user or principal.user_id


async def proxy(
    state: ServerState, request: Request, body: BaseModel, path: str, principal: Principal
) -> Response:
    """Send the request to the model's upstream servers (failover inside).

    The upstream records the request (usage, request log) itself: replicas share the
    catalog, and counting it here too would count it twice. Metrics count it here.
    """
    payload = body.model_dump(exclude_unset=True)
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


BuildJob = Callable[["LoadedModel"], Coroutine[Any, Any, TextJob]]


async def serve_text(
    state: ServerState,
    request: Request,
    body: SamplingFields,
    principal: Principal,
    *,
    endpoint: str,
    build: BuildJob,
    respond: Callable[[TextRun, list[ChoiceResult]], dict[str, Any]],
    head: Callable[[TextRun], list[dict[str, Any]]],
    chunk: Callable[[TextRun, Piece], dict[str, Any] | None],
    usage_chunk: Callable[[TextRun], dict[str, Any]],
) -> Response:
    """The flow both text endpoints share: route, lease, build, admit, generate, answer."""
    if state.upstreams.has(body.model) and not state.models.has(body.model):
        return await proxy(state, request, body, "/" + endpoint.replace(".", "/"), principal)
    loaded = await state.models.acquire(body.model)
    try:
        job = await build(loaded)
        await state.check_rate(principal, tokens=job.prompt_tokens)
        run = TextRun(state, job)
        await run.submit()
    except BaseException as exc:
        state.models.release(loaded)
        if isinstance(exc, Exception):
            _failed(state, loaded, exc, endpoint, body, principal)
        raise
    headers = {"X-Request-Id": job.response_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        response = stream_run(
            run,
            head=head(run),
            chunk=lambda piece: chunk(run, piece),
            usage_chunk=(lambda: usage_chunk(run)) if include_usage else None,
            on_close=lambda: state.models.release(loaded),
        )
        response.headers.update(headers)
        return response
    status, kind = 500, "internal"
    try:
        results = await until_disconnected(request, run.collect())
        if results is None:
            status, kind = 499, "disconnected"
            return Response(status_code=499)
        status, kind = 200, ""
        return JSONResponse(respond(run, results), headers=headers)
    except Exception as exc:
        status = int(getattr(exc, "http_status", 500))
        kind = error_type(exc)
        raise
    finally:
        await run.close()
        await run.finish(status, kind or None)
        state.models.release(loaded)


def _failed(
    state: ServerState,
    loaded: LoadedModel,
    exc: Exception,
    endpoint: str,
    body: SamplingFields,
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
                    endpoint=endpoint,
                    model_name=info.name,
                    model_version=info.version,
                    api_key_id=principal.key_id,
                    key_prefix=principal.prefix,
                    user_id=user_of(body, principal),
                    status=status,
                )
            )
    except Exception:
        log.exception("could not record a failed request")
