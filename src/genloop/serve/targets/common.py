"""What the three platform routers share: reading the body, answering errors in the
platform's shape, readiness."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from genloop.errors import GenloopError
from genloop.serve.errors import invalid
from genloop.serve.targets.predict import parse_body, predict

if TYPE_CHECKING:
    from starlette.requests import Request

    from genloop.security.keys import Principal

log = logging.getLogger(__name__)

ErrorShape = Callable[[int, str], dict[str, Any]]


def error(
    status: int, message: str, shape: ErrorShape, retry_after_s: float | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s else None
    return JSONResponse(shape(status, message), status_code=status, headers=headers)


def ready(request: Request) -> str | None:
    """None when the served model is loaded and the server is not draining, else why not."""
    from genloop.serve.state import get_state

    state = get_state(request)
    if state.draining or state.models.draining:
        return "draining"
    if not state.models.ready:
        return "loading"
    return None


async def answer(
    request: Request,
    principal: Principal,
    shape: ErrorShape,
    to_instances: Callable[[Any, Request], Any] | None = None,
    respond: Callable[[Any, list[dict[str, Any]]], Any] | None = None,
    *,
    plain_text: bool = False,
) -> JSONResponse:
    """Read the body (``plain_text``: a ``text/plain`` body is one prompt), predict, and
    answer ``{"predictions": [...]}`` (or ``respond``'s body); any refusal is its status
    with ``shape``'s body, never a 500 for bad input."""
    from genloop.serve.state import get_state

    try:
        raw = await request.body()
        if plain_text and request.headers.get("content-type", "").startswith("text/plain"):
            try:
                body: Any = raw.decode("utf-8")  # a bare prompt
            except UnicodeDecodeError:
                raise invalid("a text/plain body must be UTF-8 text") from None
        else:
            body = parse_body(raw)
        wrapped = to_instances(body, request) if to_instances is not None else body
        predictions = await predict(get_state(request), request, principal, wrapped)
    except GenloopError as exc:
        status = int(getattr(exc, "http_status", 400))
        return error(status, str(exc), shape, getattr(exc, "retry_after_s", None))
    out = respond(body, predictions) if respond is not None else {"predictions": predictions}
    return JSONResponse(out)
