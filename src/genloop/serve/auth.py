"""API-key authentication and scopes, as FastAPI dependencies.

Every route but ``/health`` (and ``/metrics`` when ``serve.metrics_public``) depends on
:func:`require_scope`: ``Authorization: Bearer gl_...`` is checked against the catalog
(``genloop.security.keys.verify_key``: unknown, revoked or expired → 401), then the scope
(→ 403), then the key's requests-per-minute budget (→ 429 with ``Retry-After``; 503 on a
client route while Redis is down and ``serve.rate_limit.on_redis_down`` is fail_closed).
``create_app`` refuses to build an app with a route that has no such dependency.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from genloop.serve.errors import ApiError
from genloop.serve.state import get_state

if TYPE_CHECKING:
    from genloop.security.keys import Principal

Scope = Literal["generate", "feedback", "label", "metrics", "admin"]
SCOPES: tuple[Scope, ...] = ("generate", "feedback", "label", "metrics", "admin")
# scopes whose requests are refused while shared rate limits are down (fail_closed); the
# others (admin, metrics) fall back to per-process limits so operators and probes go on
CLIENT_SCOPES = frozenset({"generate", "feedback", "label"})

# auto_error=False: a missing header is our 401 in the OpenAI shape, not FastAPI's 403.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key made with `genloop keys create`: `Authorization: Bearer gl_...`",
)

AuthDependency = Callable[..., Awaitable["Principal"]]


def require_scope(scope: Scope | None) -> AuthDependency:
    """A dependency that admits keys holding ``scope`` (``None``: any valid key)."""

    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> Principal:
        from genloop.security.keys import verify_cached_key, verify_key

        state = get_state(request)
        if credentials is None or not credentials.credentials:
            raise ApiError(
                "missing API key: send 'Authorization: Bearer gl_...' "
                "(create one with 'genloop keys create')",
                status=401,
            )
        # a key checked in the last few seconds needs no catalog query, so no thread hop
        # (a hop costs a scheduler round trip per request on a busy machine)
        principal = verify_cached_key(state.ws.catalog, credentials.credentials)
        if principal is None:
            principal = await run_in_threadpool(
                verify_key, state.ws.catalog, credentials.credentials
            )
        if scope is not None:
            principal.require(scope)
        request.state.principal = principal
        # Redis down and fail_closed: client routes are refused; admin and health routes
        # fall back to per-process limits so that operators can still act
        await state.check_rate(principal, requests=1, strict=scope in CLIENT_SCOPES)
        return principal

    dependency.genloop_scope = scope  # type: ignore[attr-defined]  # read by create_app's check
    return dependency


def route_scope(dependency: object) -> tuple[bool, Scope | None]:
    """Whether ``dependency`` is a ``require_scope`` dependency, and its scope."""
    if hasattr(dependency, "genloop_scope"):
        scope: Scope | None = dependency.genloop_scope
        return True, scope
    return False, None
