"""The route of ``POST /v1/embeddings``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from genloop.security.keys import Principal
from genloop.serve.api.embeddings.protocol import EmbeddingRequest
from genloop.serve.api.embeddings.serving import serve_embeddings
from genloop.serve.auth import require_scope
from genloop.serve.state import get_state

router = APIRouter(tags=["generation"])


@router.post("/v1/embeddings", summary="Embed texts or token arrays (float or base64)")
async def create_embeddings(
    body: EmbeddingRequest,
    request: Request,
    principal: Principal = Depends(require_scope("generate")),  # noqa: B008
) -> Response:
    return await serve_embeddings(get_state(request), request, body, principal)
