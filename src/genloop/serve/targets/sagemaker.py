"""AWS SageMaker real-time inference: ``GET /ping`` and ``POST /invocations`` on port 8080.

SageMaker runs the image with ``serve``, mounts the model at ``/opt/ml/model`` and calls
``/ping`` until it answers 200 (here: once the model is loaded), then forwards each
``InvokeEndpoint`` body to ``/invocations`` as it came. The body is
``{"instances": [...], "parameters": {...}}`` → ``{"predictions": [...]}``, or one
instance alone (a JSON string or object, or ``text/plain`` for a bare prompt) → one
prediction. A refusal is its 4xx status with ``{"error": message}`` (SageMaker hands the
body to the caller as the ``ModelError``'s message).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from genloop.security.keys import Principal
from genloop.serve.targets.common import answer, error, ready

PORT = 8080
PUBLIC = ("/ping", "/invocations")


def error_shape(status: int, message: str) -> dict[str, Any]:
    return {"error": message}


def build_router(principal: Principal) -> APIRouter:
    router = APIRouter(tags=["sagemaker"])

    @router.get("/ping", summary="SageMaker health check: 200 once the model is loaded")
    async def ping(request: Request) -> Response:
        why = ready(request)
        if why is not None:
            return error(503, f"not ready: {why}", error_shape, retry_after_s=2)
        return Response(status_code=200)

    @router.post("/invocations", summary="SageMaker inference: instances in, predictions out")
    async def invocations(request: Request) -> JSONResponse:
        return await answer(
            request, principal, error_shape, _as_instances, _respond, plain_text=True
        )

    return router


def _as_instances(body: Any, request: Request) -> Any:
    """One instance alone becomes a list of one (``_respond`` unwraps its prediction)."""
    if isinstance(body, dict) and "instances" in body:
        return body
    return {"instances": [body]}


def _respond(body: Any, predictions: list[dict[str, Any]]) -> Any:
    if isinstance(body, dict) and "instances" in body:
        return {"predictions": predictions}
    return predictions[0]
