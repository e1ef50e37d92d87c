"""``/v1/admin/feedback``: feedback rows to review, approve or reject."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from genloop.errors import NotFoundError
from genloop.security.keys import Principal
from genloop.serve.api.admin.common import MAX_ID, NAME, Admin, id_param, limit_query
from genloop.serve.state import get_state

router = APIRouter()


@router.get("/feedback", summary="Feedback rows, newest first (texts not decrypted)")
def list_feedback(
    request: Request,
    _: Principal = Admin,
    status: Literal["pending", "approved", "rejected"] | None = None,
    model: str | None = Query(None, pattern=NAME),
    user_id: str | None = Query(None, max_length=128),
    limit: int = limit_query(),
) -> dict[str, Any]:
    from genloop.feedback.store import count_feedback
    from genloop.feedback.store import list_feedback as _list

    ws = get_state(request).ws
    rows = _list(ws, status=status, model=model, user_id=user_id, limit=limit)
    return {"object": "list", "data": [r.to_dict() for r in rows], "counts": count_feedback(ws)}


@router.get("/feedback/{feedback_id}", summary="One feedback row with its texts")
def get_feedback(
    request: Request, feedback_id: int = id_param(), _: Principal = Admin
) -> dict[str, Any]:
    from genloop.feedback.store import get_feedback as _get

    state = get_state(request)
    return _get(state.ws, state.cipher, feedback_id).to_dict()


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[int] = Field(min_length=1, max_length=1000)
    decision: Literal["approved", "rejected"]


@router.post("/feedback/review", summary="Approve or reject feedback rows")
def review_feedback(
    request: Request, body: ReviewRequest, principal: Principal = Admin
) -> dict[str, Any]:
    from genloop.feedback.store import review

    ids = [i for i in body.ids if 1 <= i <= MAX_ID]
    if len(ids) != len(body.ids):
        raise NotFoundError("no feedback with such an id")
    changed = review(get_state(request).ws, ids, body.decision, actor=principal.actor)
    return {"changed": changed, "decision": body.decision}
