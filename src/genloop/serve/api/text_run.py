"""One text request on the engine: the run behind ``/v1/completions`` and
``/v1/chat/completions``.

One API request becomes one engine request per choice (each prompt × ``n``), all on the
model version the request resolved to. :class:`TextRun` submits them, merges their
events (interleaved when there are several choices), applies the output guardrails on
the way (a runaway repetition is cut with ``finish_reason: stop`` and a flag; blocked
output ends with ``finish_reason: content_filter``), and, once the response is done —
complete, failed, or abandoned by a client that went away — records it: the request
row and usage bucket (``genloop.monitor.usage``), the Prometheus figures, and the
generated tokens charged to the key's tokens-per-minute budget.

Closing the engine's iterators is what frees their batch slots, so every path out of
here closes them: the end of the response, an error, a cut, a client disconnect (the
stream is cancelled; for a non-streamed request ``streaming.until_disconnected``
notices).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio

from genloop.serve.engine.types import (
    Event,
    Finished,
    GenerationRequest,
    PromptLogprobs,
    SamplingParams,
    TokenDelta,
)
from genloop.serve.errors import ApiError

if TYPE_CHECKING:
    from genloop.security.keys import Principal
    from genloop.security.ratelimit import Reservation
    from genloop.serve.models import LoadedModel
    from genloop.serve.state import ServerState

log = logging.getLogger(__name__)

SEED_MOD = 2**64


@dataclass
class TextJob:
    """One validated, tokenized API request, ready for the engine."""

    endpoint: str  # "completions" | "chat.completions"
    response_id: str
    loaded: LoadedModel
    prompts: list[list[int]]  # token ids of each prompt
    n: int
    params: SamplingParams
    principal: Principal
    user_id: str | None
    log_prompt: str  # the prompt as the request log keeps it (chat: JSON of the messages)
    log_params: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    grammar: str | None = None  # the output must match it (api/structured.py)
    started: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    reservation: Reservation | None = None  # the tokens the rate limits hold for it

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    tokens: list[TokenDelta] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    flags: list[str] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # when the request asked (echo + logprobs)


@dataclass(frozen=True)
class Piece:
    """One step of one choice: its prompt's log-probabilities (``prompt``, first, when
    asked for), a token, or (``finish_reason`` set) its end."""

    index: int
    delta: TokenDelta | None = None
    finish_reason: str | None = None
    prompt: PromptLogprobs | None = None


_DONE = object()


class TextRun:
    def __init__(self, state: ServerState, job: TextJob) -> None:
        self.state = state
        self.job = job
        self.results = [ChoiceResult(i) for i in range(job.choices)]
        self._events: list[AsyncIterator[Event]] = []
        self._recorded = False
        self._check_output = bool(state.cfg.security.guardrails.blocklist_output)

    # ------------------------------------------------------------------ engine

    async def submit(self) -> None:
        """Queue every choice; EngineBusy (429) / EngineStopped (503) leave nothing queued."""
        job = self.job
        engine = job.loaded.text_engine()
        deadline = time.monotonic() + self.state.cfg.serve.request_timeout_s
        try:
            for i in range(job.choices):
                params = job.params
                if params.seed is not None and i > 0:
                    params = replace(params, seed=(params.seed + i) % SEED_MOD)
                request = GenerationRequest(
                    request_id=f"{job.response_id}-{i}",
                    prompt_ids=job.prompts[i // job.n],
                    params=params,
                    deadline=deadline,
                    grammar=job.grammar,
                )
                self._events.append(engine.submit(request))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every engine iterator (frees their slots); safe to call again."""
        events, self._events = self._events, []
        with anyio.CancelScope(shield=True):
            for it in events:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:
                        log.exception("closing an engine stream failed")

    async def pieces(self) -> AsyncIterator[Piece]:
        """Every choice's pieces as they come; engine failures raise ApiError."""
        try:
            if len(self._events) == 1:
                async for piece in self._choice(0, self._events[0]):
                    yield piece
                return
            queue: asyncio.Queue[Any] = asyncio.Queue()

            async def pump(i: int, events: AsyncIterator[Event]) -> None:
                try:
                    async for piece in self._choice(i, events):
                        queue.put_nowait(piece)
                except Exception as exc:
                    queue.put_nowait(exc)
                finally:
                    queue.put_nowait(_DONE)

            tasks = [asyncio.create_task(pump(i, e)) for i, e in enumerate(self._events)]
            try:
                remaining = len(tasks)
                while remaining:
                    item = await queue.get()
                    if item is _DONE:
                        remaining -= 1
                    elif isinstance(item, Exception):
                        raise item
                    else:
                        yield item
            finally:
                for task in tasks:
                    task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self.close()

    async def _choice(self, i: int, events: AsyncIterator[Event]) -> AsyncIterator[Piece]:
        result = self.results[i]
        # a grammar bounds the output, and cutting it would break its JSON: no repetition cut
        guard = self.state.guardrails.repetition_guard() if self.job.grammar is None else None
        async for event in events:
            if isinstance(event, PromptLogprobs):
                result.prompt_logprobs = event
                yield Piece(i, prompt=event)
                continue
            if isinstance(event, Finished):
                result.completion_tokens = event.completion_tokens
                if event.reason not in ("stop", "length"):
                    raise self._failure(event)
                result.text = event.text  # authoritative: the stop string removed
                result.finish_reason = event.reason
                if self._check_output:
                    verdict = self.state.guardrails.check_output(result.text)
                    result.flags += verdict.flags
                    if verdict.refused:
                        result.text, result.finish_reason = "", "content_filter"
                yield Piece(i, finish_reason=result.finish_reason)
                return
            result.completion_tokens += 1
            if guard is not None and guard.feed(event.text):
                result.flags.append("repetition")
                result.finish_reason = "stop"
                yield Piece(i, finish_reason="stop")
                return
            if self._check_output:
                verdict = self.state.guardrails.check_output(result.text + event.text)
                if verdict.refused:
                    result.flags += verdict.flags
                    result.finish_reason = "content_filter"
                    yield Piece(i, finish_reason="content_filter")
                    return
            result.text += event.text
            result.tokens.append(event)
            yield Piece(i, delta=event)
        raise ApiError("the engine ended a stream without finishing it", status=500)

    def _failure(self, event: Finished) -> ApiError:
        timeout = self.state.cfg.serve.request_timeout_s
        if event.reason == "timeout":
            return ApiError(
                f"the request took longer than {timeout:g}s and was stopped",
                status=504,
                code="timeout",
            )
        if event.reason == "cancelled":
            return ApiError(
                "the request was aborted: the server is shutting down or swapping models",
                status=503,
                code="aborted",
                retry_after_s=1.0,
            )
        log.error("generation failed for %s: %s", self.job.response_id, event.error)
        return ApiError("generation failed", status=500, code="engine_error")

    def token_text(self, token: TokenDelta) -> str:
        """The token's own text (a delta's text is "" while a character is incomplete)."""
        engine = self.job.loaded.engine  # None once an aborted version is unloaded
        return engine.token_text(token.token_id) if engine is not None else token.text

    def prompt_token_texts(self, token_ids: list[int]) -> list[str]:
        """Each prompt token's own text (echo with logprobs)."""
        engine = self.job.loaded.engine
        if engine is None:  # an aborted version, unloaded: its tokenizer went with it
            return ["" for _ in token_ids]
        return [engine.token_text(t) for t in token_ids]

    async def collect(self) -> list[ChoiceResult]:
        async for _ in self.pieces():
            pass
        return self.results

    # ------------------------------------------------------------------ bookkeeping

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    def usage(self) -> dict[str, int]:
        prompt, completion = self.job.prompt_tokens, self.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def finish(self, status: int, error_type: str | None = None) -> None:
        """Record the request once: catalog row, usage, metrics, token budget."""
        if self._recorded:
            return
        self._recorded = True
        state, job = self.state, self.job
        info = job.loaded.info
        completion = self.completion_tokens
        flags = list(dict.fromkeys(job.flags + [f for r in self.results for f in r.flags]))
        finish = self.results[0].finish_reason if self.results else None
        e2e = time.monotonic() - job.started
        record_status = status
        try:
            from genloop.monitor.usage import RequestRecord

            logprobs = [t.logprob for r in self.results for t in r.tokens if t.logprob is not None]
            one = len(self.results) == 1
            response = (
                self.results[0].text
                if one
                else json.dumps([r.text for r in self.results], ensure_ascii=False)
            )
            state.recorder.submit(
                RequestRecord(
                    request_id=job.response_id,
                    endpoint=job.endpoint,
                    model_name=info.name,
                    model_version=info.version,
                    api_key_id=job.principal.key_id,
                    key_prefix=job.principal.prefix,
                    user_id=job.user_id,
                    prompt=job.log_prompt,
                    response=response,
                    params=job.log_params,
                    prompt_tokens=job.prompt_tokens,
                    completion_tokens=completion,
                    latency_ms=e2e * 1000.0,
                    status=record_status,
                    flags=flags,
                    mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None,
                    finish_reason=finish,
                    prompt_ids=job.prompts[0] if len(job.prompts) == 1 else None,
                    output_ids=[t.token_id for t in self.results[0].tokens] if one else None,
                )
            )
            state.metrics.request_finished(
                info.name,
                info.version,
                status,
                finish,
                job.prompt_tokens,
                completion,
                e2e,
            )
            if error_type is not None:
                state.metrics.error(info.name, error_type, info.version)
            monitor = state.extras.get("monitor")
            if monitor is not None:  # the anomaly detectors' feed (a deque append)
                failed = status >= 500 or finish in ("error", "timeout")
                monitor.observe(info.name, info.version, e2e * 1000.0, failed)
            with anyio.CancelScope(shield=True):
                await state.settle(job.reservation, job.prompt_tokens + completion)
        except Exception:
            log.exception("could not record request %s", job.response_id)
