"""Every HTTP response counted, timed and, when refused, logged: the server's outermost layer.

``genloop:requests_total`` and the request log hear only of requests that reached a model.
A request refused on the way (a missing or wrong key → 401, an unknown route or model →
404, a body over the limit → 413, a bad field → 400/422, a rate limit → 429 …) would leave
no trace. :class:`HttpMetricsMiddleware` wraps the whole app, request limits and error
handlers included, and for every response:

1. counts it in ``genloop:http_requests_total{route,method,status,reason}`` and times it in
   ``genloop:http_request_duration_seconds`` until its *last* body byte (a stream is timed
   to its end). ``route`` is the route's template (``/v1/models/{model_id}``), never the
   raw path: a path no route matches is ``unmatched``, so scanners cannot grow the series;
2. on a 401, counts the presented key's public prefix (``genloop:auth_failures_total``;
   ``missing`` or ``malformed`` when there is none to show) and tells the monitor, whose
   key-guessing watch (:class:`genloop.monitor.anomaly.AuthFailureWatch`) raises the
   ``auth_failures`` alert;
3. when the status is ≥ 400 and no handler recorded the request itself
   (:func:`mark_recorded`, called by the usage recorder), queues a *rejected* record for
   the request log: route, method, status, reason, key prefix, latency, time. Never a
   body, a header or a key; never the probes (``/health``, ``/ready``). The queue is
   bounded; what does not fit is counted in ``genloop:request_log_dropped_total``.

It is a pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which buffers and
breaks streaming) and does its bookkeeping after the response is sent: a dictionary
lookup, two metric updates and, for refusals, a queue append.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from starlette.routing import Mount, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genloop.security.keys import KEY_LENGTH, KEY_PREFIX, PREFIX_LENGTH
from genloop.serve.errors import status_reason

if TYPE_CHECKING:
    from genloop.monitor.metrics import ServingMetrics
    from genloop.monitor.usage import RequestRecord

log = logging.getLogger(__name__)

UNMATCHED = "unmatched"  # the route label of any path no route matches
# a load balancer's probes: a 503 from /ready while models load is an answer, not a refusal
PROBES = frozenset({"/health", "/ready"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_KEY = re.compile(rf"{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{{KEY_LENGTH - len(KEY_PREFIX)}}}")

# set per request by the middleware; the usage recorder marks it when it logs the request
_marks: ContextVar[dict[str, bool] | None] = ContextVar("genloop_http_marks", default=None)


def mark_recorded() -> None:
    """The current request is in the request log already (called by the usage recorder,
    from the request's own task or a thread it started: both see the same marks)."""
    marks = _marks.get()
    if marks is not None:
        marks["recorded"] = True


class RejectedLog(Protocol):
    """Where refused requests go (``ServerState.recorder``)."""

    def submit_rejected(self, record: RequestRecord) -> bool: ...


class AuthWatch(Protocol):
    """Who hears of each 401 (the monitor worker's key-guessing watch)."""

    def observe_auth_failure(self, key_label: str) -> None: ...


class HttpMetricsMiddleware:
    """Counts, times and (when refused) logs every HTTP response; see the module docstring.

    ``routes``: the app's (path template) list, for requests refused before routing (the
    request limits answer before the router runs, so the scope names no route).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServingMetrics,
        routes: Callable[[], Iterable[str]],
        rejected_log: RejectedLog | None = None,
        auth_watch: AuthWatch | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.rejected_log = rejected_log
        self.auth_watch = auth_watch
        self._routes = routes
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        ended: float | None = None

        async def timed_send(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = time.perf_counter()

        marks: dict[str, bool] = {}
        token = _marks.set(marks)
        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            # a bug: Starlette's error middleware, outside this one, answers it with a 500
            status = status or 500
            raise
        finally:
            _marks.reset(token)
            seconds = (ended if ended is not None else time.perf_counter()) - started
            # no answer at all (the request was cancelled): nginx's 499, client closed
            try:
                self._finished(scope, status or 499, seconds, marks.get("recorded", False))
            except Exception:  # bookkeeping must never turn into a failed response
                log.exception("could not count an HTTP response")

    def _finished(self, scope: Scope, status: int, seconds: float, recorded: bool) -> None:
        route = self.route_label(scope, status)
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        reason = ""
        key = key_label(scope) if status >= 400 else ""
        if status == 401:
            reason = {"missing": "missing_key", "malformed": "malformed_key"}.get(
                key, "invalid_key"
            )
            self.metrics.auth_failure(key)
            if self.auth_watch is not None:
                self.auth_watch.observe_auth_failure(key)
        elif status >= 400:
            reason = {500: "internal", 499: "client_closed"}.get(status) or status_reason(status)
        self.metrics.http_response(route, method, status, reason, seconds)
        if status < 400 or recorded or self.rejected_log is None or route in PROBES:
            return
        from genloop.monitor.usage import RequestRecord

        principal = (scope.get("state") or {}).get("principal")
        record = RequestRecord(
            request_id=f"rej-{uuid.uuid4().hex}",
            endpoint=route,
            model_name="",
            api_key_id=getattr(principal, "key_id", None),
            key_prefix=key if key not in ("missing", "malformed") else None,
            latency_ms=seconds * 1000.0,
            status=status,
            rejected=True,
            method=method,
            reason=reason,
        )
        if not self.rejected_log.submit_rejected(record):
            self.metrics.log_dropped_record("rejected")

    def route_label(self, scope: Scope, status: int) -> str:
        """The template of the route that answered (or would have: a request refused
        before routing), or :data:`UNMATCHED`."""
        route = scope.get("route")
        if isinstance(route, Mount):  # the web UI's static files at /: any path at all
            return UNMATCHED if status >= 400 else route.path + "/{path}"
        if route is not None:
            path = getattr(route, "path_format", None) or getattr(route, "path", None)
            if isinstance(path, str) and path:
                return path
        # refused before routing (the request limits), or the router matched nothing
        return self._match(scope.get("path", ""))

    def _match(self, path: str) -> str:
        if self._templates is None:  # the routes are all in place by the first request
            self._templates = [(compile_path(t)[0], t) for t in sorted(set(self._routes()))]
        for regex, template in self._templates:
            if regex.match(path):
                return template
        return UNMATCHED


def key_label(scope: Scope) -> str:
    """The public prefix of the presented API key (``gl_`` + 8 characters, as the catalog
    keeps it), ``missing`` without one, ``malformed`` for anything not shaped like a key.
    Never more of the key than its prefix."""
    value: bytes | None = None
    for name, raw in scope.get("headers", ()):
        if name == b"authorization":
            value = raw
            break
    if value is None:
        return "missing"
    text = value.decode("latin-1").strip()
    scheme, _, token = text.partition(" ")
    token = token.strip()
    if not text or (scheme.lower() == "bearer" and not token):
        return "missing"
    if scheme.lower() != "bearer":
        return "malformed"
    if not _KEY.fullmatch(token):
        return "malformed"
    return token[:PREFIX_LENGTH]
