"""The route of ``POST /v1/images/generations``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from genloop.security.keys import Principal
from genloop.serve.api.images.protocol import ImageRequest
from genloop.serve.api.images.serving import serve_images
from genloop.serve.auth import require_scope
from genloop.serve.state import get_state

router = APIRouter(tags=["generation"])


@router.post("/v1/images/generations", summary="Generate images (base64 PNG)")
async def create_images(
    body: ImageRequest,
    request: Request,
    principal: Principal = Depends(require_scope("generate")),  # noqa: B008
) -> Response:
    return await serve_images(get_state(request), request, body, principal)
