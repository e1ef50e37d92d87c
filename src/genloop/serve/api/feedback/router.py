"""The route of ``POST /v1/feedback``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from genloop.security.keys import Principal
from genloop.serve.api.feedback.protocol import FeedbackRequest, FeedbackResponse
from genloop.serve.api.feedback.serving import serve_feedback
from genloop.serve.auth import require_scope
from genloop.serve.state import get_state

router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", summary="Rate a response", response_model=FeedbackResponse)
async def submit(
    body: FeedbackRequest,
    request: Request,
    principal: Principal = Depends(require_scope("feedback")),  # noqa: B008
) -> FeedbackResponse:
    return await serve_feedback(get_state(request), body, principal)
