"""The FastAPI application: ``create_app(ws, cfg)`` wires routers, limits, auth and state.

Layers, outermost first: HTTP metrics (every response counted and timed, refusals written
to the request log: ``http_metrics.py``) → CORS (only when ``serve.cors_origins`` is set)
→ request limits (header and body size, concurrency: ``limits.py``) → error handlers (OpenAI-shaped,
never a stack trace: ``errors.py``) → routers (``api/``: each endpoint family's route →
protocol models → handler → engine), each route behind ``require_scope`` (``auth.py``)
except the probes ``/health`` and ``/ready`` and, when configured public, ``/metrics``.
The app refuses to build if any other route lacks that dependency. The OpenAPI schema is
at ``/openapi.json`` (it needs a key too). The web UI, when the package ships it
(``genloop/ui/static``) and ``serve.ui`` is on, is served at ``/`` without a key: it is
static, and signs in with a key itself.

Startup loads every served model in the background (``/health`` answers at once,
``/ready`` once they are loaded) and starts the upstream health checks; shutdown drains
the engines and writes the last request records.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

import genloop
from genloop.serve.auth import require_scope, route_scope
from genloop.serve.errors import install_error_handlers
from genloop.serve.limits import LimitsMiddleware
from genloop.serve.models import ModelManager
from genloop.serve.state import ServerState, UsageRecorder
from genloop.serve.upstream import UpstreamRouter, build_routes

if TYPE_CHECKING:
    import httpx

    from genloop.config import GenloopConfig, ServeConfig
    from genloop.monitor.metrics import ServingMetrics
    from genloop.monitor.scheduler import EvaluateFn
    from genloop.serve.engine.embedder import EmbeddingEngine
    from genloop.serve.engine.protocol import ImageCaptioner, ImageGenerator, TextEngine
    from genloop.serve.models import EmbeddingLoader, ImageLoader, TextLoader, VisionLoader
    from genloop.serve.targets import TargetRoutes
    from genloop.workspace import Workspace
    from genloop.workspace.registry import ModelVersionInfo

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).resolve().parent.parent / "ui" / "static"


def create_app(
    ws: Workspace,
    cfg: GenloopConfig,
    *,
    load_text: TextLoader | None = None,
    load_image: ImageLoader | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    poll_interval_s: float = 1.0,
    evaluate: EvaluateFn | None = None,
    target: TargetRoutes | None = None,
) -> FastAPI:
    """The server for ``cfg.serve``; ``app.state.server`` is its :class:`ServerState`.

    ``load_text``/``load_image`` replace the engine and image loaders (benchmarks and tests
    of the swap logic); ``upstream_transport`` the HTTP transport to upstream servers.
    ``evaluate`` (``genloop.evaluate.run.evaluate_model``) runs the scheduled bias probes
    (``monitor.bias_interval_s``); serving never imports evaluation (nor training) itself.
    ``target`` (``serve/targets``): a cloud platform's routes, matched before the others.
    """
    from genloop.monitor.metrics import ServingMetrics
    from genloop.security.crypto import load_cipher
    from genloop.security.guardrails import Guardrails
    from genloop.security.ratelimit import make_rate_limiter

    serve = cfg.serve
    metrics = ServingMetrics()
    guardrails = Guardrails(cfg.security.guardrails)
    cipher = load_cipher(ws)
    models = ModelManager(
        ws,
        serve.models,
        load_text=load_text or _text_loader(serve, metrics),
        load_image=load_image or _image_loader,
        load_vision=_vision_loader(serve),
        load_embedding=_embedding_loader(serve),
        observer=metrics,
        poll_interval_s=poll_interval_s,
        swap_timeout_s=serve.request_timeout_s + 5.0,
    )
    upstreams = UpstreamRouter(
        build_routes(ws, serve.upstreams),
        health_interval_s=serve.upstream_health_interval_s,
        request_timeout_s=serve.request_timeout_s,
        transport=upstream_transport,
    )
    state = ServerState(
        ws=ws,
        cfg=cfg,
        models=models,
        upstreams=upstreams,
        metrics=metrics,
        guardrails=guardrails,
        cipher=cipher,
        recorder=UsageRecorder(ws, cipher, store_text=serve.store_requests, guardrails=guardrails),
        limiter=make_rate_limiter(
            serve.rate_limit,
            serve.redis_url,
            on_outage=lambda reason: _redis_outage(ws, cfg, state, reason),
            on_recovery=lambda: _redis_recovered(ws, state),
        ),
    )

    from genloop.monitor.scheduler import MonitorWorker

    def served_versions() -> list[tuple[str, int | None]]:
        return [
            (m.current.info.name, m.current.info.version)
            for m in models.served
            if m.current is not None and m.current.kind == "text"
        ]

    # drift checks, latency/error anomalies and scheduled bias probes, in a thread
    monitor = MonitorWorker(
        ws,
        cfg.monitor,
        models=served_versions,
        evaluate=evaluate,
        bias_eval=cfg.eval,
        retention_days=cfg.security.retention_days,
    )
    state.extras["monitor"] = monitor
    metrics.watch_alerts(monitor.open_alerts)  # genloop:alerts_open, counted by the monitor

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await upstreams.start()
        monitor.start()
        loading = asyncio.create_task(models.start(), name="genloop-load-models")
        state.extras["loading"] = loading
        try:
            yield
        finally:
            state.draining = True
            if not loading.done():
                loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await models.close()
            await upstreams.close()
            if state.limiter is not None:
                await state.limiter.aclose()
            await state.recorder.flush()
            state.recorder.close()
            monitor.stop()

    app = FastAPI(
        title="genloop",
        version=genloop.__version__,
        summary="An OpenAI-compatible API for genloop models, with an admin API.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind a key like every route
    )
    app.state.server = state
    install_error_handlers(app)

    from genloop.serve.api import admin, health
    from genloop.serve.api import models as models_api
    from genloop.serve.api.chat import router as chat
    from genloop.serve.api.completions import router as completions
    from genloop.serve.api.embeddings import router as embeddings
    from genloop.serve.api.feedback import router as feedback
    from genloop.serve.api.images import router as images
    from genloop.serve.api.labeling import router as labeling

    if target is not None:  # first: the platform's paths win over genloop's own
        app.include_router(target.router)
    app.include_router(health.build_router(metrics_public=serve.metrics_public))
    app.include_router(models_api.router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(images.router)
    app.include_router(embeddings.router)
    app.include_router(feedback.router)
    app.include_router(labeling.router)
    app.include_router(admin.router)

    @app.get(
        "/openapi.json",
        summary="This API's OpenAPI schema",
        dependencies=[Depends(require_scope(None))],
        include_in_schema=False,
    )
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    _add_security_scheme(app)
    public = {"/health", "/ready"} | ({"/metrics"} if serve.metrics_public else set())
    public |= target.public if target is not None else set()
    check_routes_guarded(app, public)
    _mount_ui(app, serve)

    app.add_middleware(
        LimitsMiddleware,
        max_body_bytes=serve.max_body_bytes,
        max_header_bytes=serve.max_header_bytes,
        max_concurrency=serve.max_concurrent_requests,
    )
    if serve.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=serve.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Request-Id"],
            max_age=600,
        )
    # outermost, so that nothing escapes it: every response counted, refusals logged
    from genloop.serve.http_metrics import HttpMetricsMiddleware

    app.add_middleware(
        HttpMetricsMiddleware,
        metrics=metrics,
        routes=lambda: [path for _, path in route_scopes(app)],
        rejected_log=state.recorder,
        auth_watch=monitor,
    )
    return app


def begin_drain(app: FastAPI, timeout_s: float) -> asyncio.Task[None]:
    """SIGTERM: stop admitting, let running requests finish, abort the rest at the deadline."""
    state: ServerState = app.state.server
    state.draining = True
    log.info("draining: finishing running requests (at most %.0fs)", timeout_s)
    task = asyncio.create_task(state.models.drain(timeout_s), name="genloop-drain")
    state.extras["drain"] = task  # the loop keeps only a weak reference to a task
    return task


def _dependencies(dependant: Dependant) -> list[Any]:
    found = []
    for dep in dependant.dependencies:
        found.append(dep.call)
        found += _dependencies(dep)
    return found


def _routes(app: FastAPI) -> Iterator[tuple[str, set[str], Dependant | None, Any]]:
    """(path, methods, dependant or None, the route) of every route, routers expanded."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI ≥ 0.16x: lazy routers
    except ImportError:  # pragma: no cover - older FastAPI keeps a flat list
        for route in app.routes:
            dependant = route.dependant if isinstance(route, APIRoute) else None
            yield (
                getattr(route, "path", ""),
                set(getattr(route, "methods", None) or ()),
                dependant,
                route,
            )
        return
    for ctx in iter_route_contexts(app.routes):
        dependant = getattr(ctx, "dependant", None)
        yield ctx.path or "", set(ctx.methods or ()), dependant, ctx.original_route


def route_scopes(app: FastAPI) -> dict[tuple[str, str], tuple[bool, str | None]]:
    """(method, path) → (guarded by require_scope, its scope) for every route.

    A route without a FastAPI dependant (a plain Starlette route) counts as unguarded; the
    static UI mount is left out (it is public by design).
    """
    from starlette.routing import Mount

    out: dict[tuple[str, str], tuple[bool, str | None]] = {}
    for path, methods, dependant, route in _routes(app):
        if isinstance(route, Mount) and route.name == "ui":
            continue
        guarded, scope = False, None
        for call in _dependencies(dependant) if dependant is not None else []:
            is_auth, s = route_scope(call)
            if is_auth:
                guarded, scope = True, s
        for method in methods or {"*"}:
            if method != "HEAD":
                out[(method, path)] = (guarded, scope)
    return out


def check_routes_guarded(app: FastAPI, public: set[str]) -> None:
    """Refuse to build an app with a route that needs no key (other than ``public``)."""
    open_routes = [
        f"{method} {path}"
        for (method, path), (guarded, _) in route_scopes(app).items()
        if not guarded and path not in public
    ]
    if open_routes:
        raise RuntimeError(f"routes without an API key check: {', '.join(sorted(open_routes))}")


def _redis_outage(ws: Workspace, cfg: GenloopConfig, state: ServerState, reason: str) -> None:
    """One alert per outage (and one for every replica's, within the alerts' cooldown)."""
    from genloop.monitor.alerts import raise_alert

    policy = cfg.serve.rate_limit.on_redis_down
    effect = (
        "client requests are refused with 503"
        if policy == "fail_closed"
        else "each replica limits keys on its own"
    )
    state.extras["redis_alert"] = raise_alert(
        ws,
        "rate_limits_unavailable",
        f"Redis for rate limits is unreachable ({reason}); {effect} until it returns "
        f"(serve.rate_limit.on_redis_down: {policy})",
        {"policy": policy, "reason": reason},
        severity="critical" if policy == "fail_closed" else "warning",
        source="redis",
        webhook_url=cfg.monitor.webhook_url,
    )


def _redis_recovered(ws: Workspace, state: ServerState) -> None:
    from genloop.monitor.alerts import resolve_alert

    alert_id = state.extras.pop("redis_alert", None)
    if alert_id is not None:
        resolve_alert(ws, alert_id)


def _add_security_scheme(app: FastAPI) -> None:
    """Every operation but the public ones needs the bearer key (in the schema too)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["ApiKey"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key made with `genloop keys create`.",
        }
        for (method, path), (guarded, scope) in route_scopes(app).items():
            op = schema.get("paths", {}).get(path, {}).get(method.lower())
            if op is not None:
                op["security"] = [{"ApiKey": []}] if guarded else []
                op["x-genloop-scope"] = (scope or "any key") if guarded else "none"
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _mount_ui(app: FastAPI, serve: ServeConfig) -> None:
    """The web UI's static files at ``/`` (the UI signs in with an API key itself)."""
    if not serve.ui or not (UI_DIR / "index.html").is_file():
        return
    from starlette.staticfiles import StaticFiles

    app.mount("/", StaticFiles(directory=UI_DIR, html=True), name="ui")


def _text_loader(serve: ServeConfig, metrics: ServingMetrics) -> TextLoader:
    def load(path: Path, info: ModelVersionInfo) -> TextEngine:
        from genloop.serve.engine.loader import load_text_engine

        return load_text_engine(
            path, model_name=info.name, model_version=info.version, cfg=serve, observer=metrics
        )

    return load


def _vision_loader(serve: ServeConfig) -> VisionLoader:
    def load(path: Path, info: ModelVersionInfo) -> ImageCaptioner:
        from genloop.serve.engine.loader import load_vision_engine

        return load_vision_engine(path, cfg=serve)

    return load


def _embedding_loader(serve: ServeConfig) -> EmbeddingLoader:
    def load(path: Path, info: ModelVersionInfo) -> EmbeddingEngine:
        from genloop.serve.engine.loader import load_embedding_engine

        return load_embedding_engine(
            path, model_name=info.name, model_version=info.version, cfg=serve
        )

    return load


def _image_loader(path: Path, info: ModelVersionInfo) -> ImageGenerator:
    from genloop.models.image_generation import load_generator

    generator: ImageGenerator = load_generator(path)
    return generator
