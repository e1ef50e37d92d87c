"""The route of ``POST /v1/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from genloop.security.keys import Principal
from genloop.serve.api.completions.protocol import CompletionRequest
from genloop.serve.api.completions.serving import serve_completion
from genloop.serve.auth import require_scope
from genloop.serve.state import get_state

router = APIRouter(tags=["generation"])


@router.post("/v1/completions", summary="Complete a prompt (stream: true for server-sent events)")
async def create_completion(
    body: CompletionRequest,
    request: Request,
    principal: Principal = Depends(require_scope("generate")),  # noqa: B008
) -> Response:
    return await serve_completion(get_state(request), request, body, principal)
