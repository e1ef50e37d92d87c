"""Answers and the client's connection: server-sent events that always clean up, and work
cancelled (its engine slots freed) when the client goes away before the answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's code for "client closed the request": logged, never sent
SSE_DONE = b"data: [DONE]\n\n"


def json_bytes(data: Any) -> bytes:
    """Compact JSON, UTF-8 (what every event and chunk is written as; orjson, as one per
    streamed token adds up: a non-finite float is written as null, valid JSON)."""
    return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that always clean up: ``on_close`` runs however the stream ends
    (finished, failed, or the client gone before the first byte)."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work``; cancel it (freeing its engine slots) if the client goes away first.

    Returns None when the client left: there is nobody to answer.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(request: Request) -> None:
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
