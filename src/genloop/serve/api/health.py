"""``GET /health`` (liveness), ``GET /ready`` (readiness), ``GET /metrics``.

The two probes need no key (an orchestrator's prober holds none) and so say nothing but a
status: no model names, versions or counts. ``/v1/models`` (with a key) lists what is served.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from genloop.serve.auth import require_scope
from genloop.serve.errors import error_response
from genloop.serve.state import get_state


def build_router(*, metrics_public: bool) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/health", summary="Liveness: the process answers (no key needed)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/ready",
        summary="Readiness: every served model is loaded and the server is not draining "
        "(no key needed)",
        responses={503: {"description": "Not ready (loading, or draining)"}},
    )
    async def ready(request: Request) -> Response:
        state = get_state(request)
        if state.draining or state.models.draining:
            return error_response(503, "server is draining", retry_after_s=5)
        if not state.models.ready:
            return error_response(503, "models not loaded yet", retry_after_s=2)
        return JSONResponse({"status": "ready"})

    # a Prometheus scraper's key needs only "metrics" (admin implies it)
    metrics_deps = [] if metrics_public else [Depends(require_scope("metrics"))]

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        dependencies=metrics_deps,
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics(request: Request) -> Response:
        body, content_type = get_state(request).metrics.render()
        return Response(body, media_type=content_type)

    return router
