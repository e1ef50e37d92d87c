"""Google Vertex AI custom container: health on ``$AIP_HEALTH_ROUTE``, predictions on
``$AIP_PREDICT_ROUTE``, listening on ``$AIP_HTTP_PORT`` (8080 when unset).

Vertex sets those variables when it starts the container, probes the health route until
it answers 200 (here: once the model is loaded) and forwards each ``predict`` call's body:
``{"instances": [...], "parameters": {...}}`` → ``{"predictions": [...]}``. A refusal is
its 4xx status with ``{"error": message}``. Vertex refuses bodies over 1.5 MB before
they reach the container.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from genloop.errors import ConfigError
from genloop.security.keys import Principal
from genloop.serve.targets.common import answer, error, ready

PORT = 8080
HEALTH_ROUTE = "/health"  # when run outside Vertex without the variables
PREDICT_ROUTE = "/predict"


def port(env: Mapping[str, str]) -> int:
    raw = env.get("AIP_HTTP_PORT") or str(PORT)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"AIP_HTTP_PORT is {raw!r}: it must be a port number")
    return int(raw)


def routes(env: Mapping[str, str]) -> tuple[str, str]:
    """(health route, predict route) from the environment Vertex sets."""
    health = env.get("AIP_HEALTH_ROUTE") or HEALTH_ROUTE
    predict = env.get("AIP_PREDICT_ROUTE") or PREDICT_ROUTE
    for name, route in (("AIP_HEALTH_ROUTE", health), ("AIP_PREDICT_ROUTE", predict)):
        if not route.startswith("/"):
            raise ConfigError(f"{name} is {route!r}: a route starts with /")
    if health == predict:
        raise ConfigError(f"AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE are both {health}")
    return health, predict


def error_shape(status: int, message: str) -> dict[str, Any]:
    return {"error": message}


def build_router(principal: Principal, *, health: str, predict: str) -> APIRouter:
    router = APIRouter(tags=["vertex"])

    async def health_check(request: Request) -> JSONResponse:
        why = ready(request)
        if why is not None:
            return error(503, f"not ready: {why}", error_shape, retry_after_s=2)
        return JSONResponse({"status": "ok"})

    async def prediction(request: Request) -> JSONResponse:
        return await answer(request, principal, error_shape)

    router.add_api_route(health, health_check, methods=["GET"], summary="Vertex AI health check")
    router.add_api_route(
        predict, prediction, methods=["POST"], summary="Vertex AI prediction: instances in"
    )
    return router
