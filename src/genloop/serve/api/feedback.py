"""``POST /v1/feedback``: rate a response (+1 / -1), optionally with a corrected answer."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from genloop.security.keys import Principal
from genloop.serve.auth import require_scope
from genloop.serve.state import get_state


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(
        min_length=1, max_length=64, description="The id of a response of this server."
    )
    rating: Literal[1, -1] = Field(description="+1 (good) or -1 (bad).")
    correction: str | None = Field(
        None, max_length=32_000, description="What the answer should have been."
    )
    comment: str | None = Field(None, max_length=4_000, description="Free text.")
    user: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The end user giving it (default: the API key's user).",
    )


class FeedbackResponse(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    response_id: str
    rating: int
    status: str = "pending"


router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", summary="Rate a response", response_model=FeedbackResponse)
async def submit(
    body: FeedbackRequest,
    request: Request,
    principal: Principal = Depends(require_scope("feedback")),  # noqa: B008
) -> FeedbackResponse:
    from genloop.feedback.store import submit_feedback

    state = get_state(request)
    await state.recorder.flush()  # the response's row may still be on its way to the catalog
    feedback_id = await run_in_threadpool(
        lambda: submit_feedback(
            state.ws,
            state.cipher,
            response_id=body.response_id,
            rating=body.rating,
            correction=body.correction,
            comment=body.comment,
            user_id=body.user,
            key_user_id=principal.user_id,
        )
    )
    return FeedbackResponse(id=feedback_id, response_id=body.response_id, rating=body.rating)
