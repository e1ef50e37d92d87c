"""The route of ``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from genloop.security.keys import Principal
from genloop.serve.api.chat.protocol import ChatRequest
from genloop.serve.api.chat.serving import serve_chat
from genloop.serve.auth import require_scope
from genloop.serve.state import get_state

router = APIRouter(tags=["generation"])


@router.post("/v1/chat/completions", summary="Answer a conversation (stream: true for SSE)")
async def create_chat_completion(
    body: ChatRequest,
    request: Request,
    principal: Principal = Depends(require_scope("generate")),  # noqa: B008
) -> Response:
    return await serve_chat(get_state(request), request, body, principal)
