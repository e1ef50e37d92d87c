"""Route a model name to upstream OpenAI-compatible servers, with health checks and failover.

``serve.upstreams: {code-lm: [{url: https://10.0.0.5:8000/v1, api_key_env: CODE_LM_KEY}]}``
sends requests for ``code-lm`` to those servers (other genloop replicas, or vLLM on a GPU
fleet) after this server has checked the key, the limits and the rate. The caller's key
never leaves this server: each upstream gets its own key, read when the router is built
from the environment variable its entry names (``api_key_env``) or the workspace's
encrypted secret store (``api_key_secret``, :mod:`genloop.security.secret_store`), or no
``Authorization`` header at all. Keys live in :class:`Upstream` only, never in its
``repr``, its status or a log line.

Each upstream's ``/health`` is polled every ``upstream_health_interval_s``. A request goes
to the healthy upstreams in turn (round robin), and fails over to the next one when an
upstream cannot be reached or answers 5xx before sending anything; such an upstream is
marked unhealthy until a health check passes again. When every upstream is down the
answer is 503 with ``Retry-After``. Upstream answers 4xx are passed through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from genloop.errors import ConfigError
from genloop.serve.errors import ApiError

if TYPE_CHECKING:
    from genloop.config import UpstreamConfig
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

# never "authorization": the caller's key stays here (each upstream has its own)
FORWARDED_HEADERS = ("content-type", "accept", "x-request-id")
CONNECT_TIMEOUT_S = 3.0


@dataclass(eq=False)
class Upstream:
    base_url: str  # ends with /v1
    api_key: str | None = field(default=None, repr=False)  # this upstream's own key
    healthy: bool = True  # optimistic until the first check says otherwise
    last_error: str | None = None
    checked_at: float | None = None

    @property
    def root(self) -> str:
        """The server's root (where ``/health`` lives)."""
        return self.base_url.removesuffix("/v1")


def normalize_base_url(url: str) -> str:
    """``http://host:8000``, ``…/``, ``…/v1``, ``…/v1/`` → ``http://host:8000/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def upstream_key(ws: Workspace, name: str, index: int, entry: UpstreamConfig) -> str | None:
    """The key ``serve.upstreams.<name>[<index>]`` sends: ``$api_key_env``'s value, or the
    workspace secret ``api_key_secret``; None when the entry names neither."""
    where = f"serve.upstreams.{name}[{index}]"
    if entry.api_key_secret is not None:
        from genloop.errors import NotFoundError
        from genloop.security.secret_store import get_secret

        try:
            return get_secret(ws, entry.api_key_secret)
        except NotFoundError as exc:
            raise ConfigError(f"{where}.api_key_secret: {exc}") from None
    env = entry.api_key_env
    if env is None:
        return None
    key = os.environ.get(env, "").strip()
    if not key:
        raise ConfigError(
            f"{where}.api_key_env names ${env}, which is not set: "
            f"export {env}=<the upstream's key> before starting the server"
        )
    return key


def build_routes(
    ws: Workspace, upstreams: dict[str, list[UpstreamConfig]]
) -> dict[str, list[Upstream]]:
    """``serve.upstreams`` → upstreams with their keys read from the environment or the
    workspace's secret store."""
    routes: dict[str, list[Upstream]] = {}
    for name, entries in upstreams.items():
        seen: dict[str, Upstream] = {}
        for i, entry in enumerate(entries):
            url = normalize_base_url(entry.url)
            if url not in seen:
                seen[url] = Upstream(url, api_key=upstream_key(ws, name, i, entry))
        routes[name] = list(seen.values())
    return routes


class UpstreamRouter:
    def __init__(
        self,
        routes: dict[str, list[Upstream]],
        *,
        health_interval_s: float = 10.0,
        request_timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.routes = routes
        self.health_interval_s = health_interval_s
        self.request_timeout_s = request_timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._health: asyncio.Task[None] | None = None
        self._turn = {name: itertools.count() for name in self.routes}

    def names(self) -> list[str]:
        return list(self.routes)

    def has(self, model: str) -> bool:
        return model in self.routes

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(self.request_timeout_s, connect=CONNECT_TIMEOUT_S),
                follow_redirects=False,
                trust_env=False,  # never route through a proxy from the environment
            )
        return self._client

    async def start(self) -> None:
        if self.routes:
            await self.check_all()
            self._health = asyncio.create_task(self._health_loop(), name="genloop-upstreams")

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ health

    async def check(self, upstream: Upstream) -> bool:
        try:
            r = await self.client.get(upstream.root + "/health", timeout=CONNECT_TIMEOUT_S)
            ok = r.status_code == 200
            error = None if ok else f"/health answered {r.status_code}"
        except httpx.HTTPError as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if ok != upstream.healthy:
            if ok:
                log.info("upstream %s is healthy again", upstream.base_url)
            else:
                log.warning("upstream %s is unhealthy: %s", upstream.base_url, error)
        upstream.healthy, upstream.last_error = ok, error
        upstream.checked_at = time.time()
        return ok

    async def check_all(self) -> None:
        ups = [u for group in self.routes.values() for u in group]
        await asyncio.gather(*(self.check(u) for u in ups))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_all()

    def status(self) -> dict[str, list[dict[str, Any]]]:
        return {
            name: [
                {"url": u.base_url, "healthy": u.healthy, "last_error": u.last_error} for u in group
            ]
            for name, group in self.routes.items()
        }

    def listing(self) -> list[dict[str, Any]]:
        return [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "upstream",
                "kind": "text",
                "healthy": any(u.healthy for u in group),
            }
            for name, group in self.routes.items()
        ]

    # ------------------------------------------------------------------ routing

    def candidates(self, model: str) -> list[Upstream]:
        """Healthy upstreams first, starting one further each request; then the others."""
        group = self.routes[model]
        start = next(self._turn[model]) % len(group)
        ordered = group[start:] + group[:start]
        return [u for u in ordered if u.healthy] + [u for u in ordered if not u.healthy]

    async def forward(
        self, model: str, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> Response:
        """POST ``body`` to ``<upstream>/v1<path>``; stream back when ``body['stream']``."""
        sent = {k: v for k, v in headers.items() if k.lower() in FORWARDED_HEADERS}
        sent["content-type"] = "application/json"
        payload = json.dumps(body).encode()
        stream = bool(body.get("stream"))
        errors: list[str] = []
        for upstream in self.candidates(model):
            request = self.client.build_request(
                "POST", upstream.base_url + path, content=payload, headers=sent | _auth(upstream)
            )
            try:
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                self._failed(upstream, f"{type(exc).__name__}: {exc}", errors)
                continue
            if response.status_code >= 500:
                await response.aclose()
                self._failed(upstream, f"answered {response.status_code}", errors)
                continue
            if stream and response.status_code == 200:
                return StreamingResponse(
                    _relay(response),
                    status_code=200,
                    media_type=response.headers.get("content-type", "text/event-stream"),
                    headers={"Cache-Control": "no-cache", "X-Genloop-Upstream": upstream.root},
                    background=BackgroundTask(response.aclose),
                )
            try:
                content = await response.aread()
            except httpx.HTTPError as exc:
                self._failed(upstream, f"{type(exc).__name__}: {exc}", errors)
                continue
            finally:
                await response.aclose()
            try:
                data = json.loads(content)
            except ValueError:
                self._failed(upstream, "answered something that is not JSON", errors)
                continue
            keep = {"retry-after"} if response.status_code in (429, 503) else set()
            passed = {k: v for k, v in response.headers.items() if k.lower() in keep}
            passed["X-Genloop-Upstream"] = upstream.root
            return JSONResponse(data, status_code=response.status_code, headers=passed)
        raise ApiError(
            f"no upstream for model {model!r} is reachable ({'; '.join(errors)})",
            status=503,
            code="upstream_unavailable",
            retry_after_s=self.health_interval_s,
        )

    def _failed(self, upstream: Upstream, error: str, errors: list[str]) -> None:
        log.warning("upstream %s failed: %s; trying the next one", upstream.base_url, error)
        upstream.healthy, upstream.last_error = False, error
        errors.append(f"{upstream.root}: {error}")


def _auth(upstream: Upstream) -> dict[str, str]:
    return {"authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream's bytes as they come; closing it (client gone) closes the upstream."""
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.HTTPError as exc:
        # The upstream broke mid-stream: end with an error event the client can see.
        message = json.dumps(
            {
                "error": {
                    "message": f"upstream failed: {exc}",
                    "type": "server_error",
                    "param": None,
                    "code": "upstream_error",
                }
            }
        )
        yield f"data: {message}\n\n".encode()
    finally:
        await response.aclose()
