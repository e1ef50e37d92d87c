"""Request limits applied before any route runs: header size, body size, concurrency.

A pure ASGI middleware, so it sees every request (routes, static files, unknown paths):

- the request line and headers together may not exceed ``max_header_bytes`` → 431
  (uvicorn's own h11 limit, set by ``genloop serve`` a little above it, bounds what is
  buffered before we see it);
- a body larger than ``max_body_bytes`` → 413, refused from ``Content-Length`` before a byte
  is read, and counted while it streams in when it comes chunked (no length);
- more than ``max_concurrency`` requests in progress → 503 with ``Retry-After`` (``/health``
  is exempt, so a busy server still answers its liveness probe).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genloop.serve.errors import error_body, retry_after_header

EXEMPT_FROM_CONCURRENCY = frozenset({"/health"})


async def send_error(
    send: Send, status: int, message: str, *, headers: dict[str, str] | None = None
) -> None:
    """Answer with an OpenAI-shaped error from ASGI level (outside FastAPI)."""
    body = json.dumps(error_body(status, message)).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class LimitsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_header_bytes: int,
        max_concurrency: int,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_concurrency = max_concurrency
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = len(scope.get("raw_path") or scope["path"].encode()) + len(
            scope.get("query_string", b"")
        )
        header_bytes += sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
        if header_bytes > self.max_header_bytes:
            await send_error(
                send, 431, f"request headers too large (limit {self.max_header_bytes} bytes)"
            )
            return
        length = _content_length(scope)
        if length == -1:
            await send_error(send, 400, "invalid Content-Length header")
            return
        if length is not None and length > self.max_body_bytes:
            await send_error(send, 413, _too_large(self.max_body_bytes))
            return
        exempt = scope["path"] in EXEMPT_FROM_CONCURRENCY
        if not exempt and self.in_flight >= self.max_concurrency:
            await send_error(
                send,
                503,
                f"server busy: {self.in_flight} requests in progress, try again shortly",
                headers=retry_after_header(1),
            )
            return
        if not exempt:
            self.in_flight += 1
        try:
            await self.app(scope, _counting(receive, self.max_body_bytes), send)
        finally:
            if not exempt:
                self.in_flight -= 1


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when absent, -1 when malformed."""
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            if not text.isascii() or not text.isdigit() or len(text) > 18:
                return -1
            return int(text)
    return None


def _too_large(limit: int) -> str:
    return f"request body too large (limit {limit} bytes)"


def _counting(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message: dict[str, Any] = dict(await receive())
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # FastAPI re-raises HTTPExceptions from body reading as they are; the
                # exception handler turns this one into the OpenAI-shaped 413.
                raise StarletteHTTPException(413, detail=_too_large(limit))
        return message

    return wrapped
