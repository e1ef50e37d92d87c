"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every error the server answers goes through :func:`error_response`, so the official
``openai`` client raises its usual exception classes (``BadRequestError``,
``AuthenticationError``, ``RateLimitError`` …) for our answers. A user mistake is a
:class:`~genloop.errors.GenloopError` and keeps its ``http_status`` and message; anything
else is a bug: it is logged with its traceback on the server and answered with a generic
500 that shows nothing of the internals. The one exception is a catalog that cannot be
reached (PostgreSQL restarting, a failover): that is a 503 with ``Retry-After``, so clients
and load balancers retry instead of treating it as a bug.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from genloop.errors import GenloopError

log = logging.getLogger(__name__)

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}
ERROR_CODES: dict[int, str] = {
    401: "invalid_api_key",
    403: "insufficient_scope",
    404: "not_found",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    431: "headers_too_large",
    503: "overloaded",
    504: "timeout",
}


class ApiError(GenloopError):
    """A request the server refuses, with the OpenAI ``param`` and ``code`` fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = status
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 naming the offending request field."""
    return ApiError(message, status=400, param=param, code=code)


STATUS_REASONS: dict[int, str] = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    429: "busy",  # a key's rate limit or a full queue: the client should come back later
    431: "headers_too_large",
    503: "unavailable",
    504: "timeout",
}


def status_reason(status: int) -> str:
    """A short stable word for an error status (the error counters' ``type``/``reason``)."""
    return STATUS_REASONS.get(status, "invalid_request" if status < 500 else "engine")


def error_type(exc: BaseException) -> str:
    """A short stable word for the metrics' error counter."""
    if isinstance(exc, GenloopError):
        return status_reason(int(getattr(exc, "http_status", 400)))
    return "internal"


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code if code is not None else ERROR_CODES.get(status),
        }
    }


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1, as the header has no fractions)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    all_headers = dict(headers or {})
    if retry_after_s is not None:
        all_headers.update(retry_after_header(retry_after_s))
    if status == 401:
        all_headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(
        error_body(status, message, param=param, code=code),
        status_code=status,
        headers=all_headers,
    )


def _genloop_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GenloopError)
    status = int(getattr(exc, "http_status", 400))
    if status >= 500 and status not in (503, 504):
        log.error("request failed: %s", exc, extra={"path": request.url.path})
    retry = getattr(exc, "retry_after_s", None)
    if retry is None and status in (429, 503):
        retry = 1.0
    return error_response(
        status,
        str(exc),
        param=getattr(exc, "param", None),
        code=getattr(exc, "code", None),
        retry_after_s=retry,
    )


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` → ``"messages[0].content"``."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = _loc_param(loc)
    msg = str(first.get("msg", "invalid value"))
    where = f"{loc[0]} " if loc and loc[0] in ("query", "path", "header") else ""
    if param:
        message = f"invalid {where}field {param!r}: {msg}"
    elif loc[:1] == ("body",):
        message = "the request body must be a JSON object (Content-Type: application/json)"
    else:
        message = f"invalid request: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(400, message, param=param, code="invalid_value")


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    if status == 404 and detail == "Not Found":
        detail = f"no route {request.url.path}"
    if status == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    headers = dict(exc.headers or {})
    return error_response(status, detail, headers=headers)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug: the trace goes to the server log, never to the client.
    log.error(
        "internal error on %s %s",
        request.method,
        request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return error_response(500, "internal server error", code="internal_error")


def _catalog_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The database is down or restarting: transient, not a bug. One line, no traceback
    # (the driver's message names the host, not a secret: the URL's password is not in it).
    log.warning(
        "catalog unavailable on %s %s: %s",
        request.method,
        request.url.path,
        type(getattr(exc, "orig", None) or exc).__name__,
    )
    return error_response(
        503,
        "the catalog database is unavailable; retry shortly",
        code="catalog_unavailable",
        retry_after_s=CATALOG_RETRY_AFTER_S,
    )


CATALOG_RETRY_AFTER_S = 2.0


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GenloopError, _genloop_error)
    app.add_exception_handler(OperationalError, _catalog_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
