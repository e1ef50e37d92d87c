"""Azure Machine Learning managed online endpoint (custom container): liveness ``GET /``,
readiness ``GET /ready``, scoring ``POST /score``, on port 5001.

Those are the conventional routes of Azure ML's inference server; a custom container
names its own in the deployment's environment (``inference_config``: ``liveness_route``,
``readiness_route``, ``scoring_route``, each a port and a path), so the deployment YAML
in docs/deploy.md names these. Azure mounts the registered model under
``$AZUREML_MODEL_DIR``. The body is ``{"instances": [...], "parameters": {...}}`` →
``{"predictions": [...]}``; a refusal is its 4xx status with
``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from genloop.security.keys import Principal
from genloop.serve.targets.common import answer, error, ready

PORT = 5001
PUBLIC = ("/", "/ready", "/score")
CODES = {400: "BadRequest", 413: "PayloadTooLarge", 429: "TooManyRequests", 503: "NotReady"}


def error_shape(status: int, message: str) -> dict[str, Any]:
    code = CODES.get(status, "BadRequest" if status < 500 else "InternalError")
    return {"error": {"code": code, "message": message}}


def build_router(principal: Principal) -> APIRouter:
    router = APIRouter(tags=["azureml"])

    @router.get("/", summary="Azure ML liveness: the process answers")
    async def live() -> JSONResponse:
        return JSONResponse({"status": "Healthy"})

    @router.get("/ready", summary="Azure ML readiness: 200 once the model is loaded")
    async def readiness(request: Request) -> JSONResponse:
        why = ready(request)
        if why is not None:
            return error(503, f"not ready: {why}", error_shape, retry_after_s=2)
        return JSONResponse({"status": "Ready"})

    @router.post("/score", summary="Azure ML scoring: instances in, predictions out")
    async def score(request: Request) -> JSONResponse:
        return await answer(request, principal, error_shape)

    return router
