"""``GET /v1/models`` and ``GET /v1/models/{model}``: what this server answers for."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request

from genloop.serve.auth import require_scope
from genloop.serve.errors import ApiError
from genloop.serve.state import get_state

router = APIRouter(tags=["models"], dependencies=[Depends(require_scope("generate"))])


def _all(request: Request) -> list[dict[str, Any]]:
    state = get_state(request)
    local = state.models.listing()
    names = {m["id"] for m in local}
    return local + [m for m in state.upstreams.listing() if m["id"] not in names]


@router.get("/v1/models", summary="List the models served (local refs and upstream routes)")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _all(request)}


@router.get("/v1/models/{model}", summary="One served model")
async def get_model(
    request: Request, model: str = Path(max_length=200, description="A model id from /v1/models")
) -> dict[str, Any]:
    for entry in _all(request):
        if entry["id"] == model or entry.get("ref") == model:
            return entry
    raise ApiError(f"model {model!r} is not served here", status=404, param="model")
