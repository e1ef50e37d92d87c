"""The handler of ``POST /v1/feedback``: the rating goes to the feedback store, linked to
the response's request row."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from genloop.serve.api.feedback.protocol import FeedbackResponse

if TYPE_CHECKING:
    from genloop.security.keys import Principal
    from genloop.serve.api.feedback.protocol import FeedbackRequest
    from genloop.serve.state import ServerState


async def serve_feedback(
    state: ServerState, body: FeedbackRequest, principal: Principal
) -> FeedbackResponse:
    from genloop.feedback.store import submit_feedback

    await state.recorder.flush()  # the response's row may still be on its way to the catalog
    feedback_id = await run_in_threadpool(
        lambda: submit_feedback(
            state.ws,
            state.cipher,
            response_id=body.response_id,
            rating=body.rating,
            correction=body.correction,
            comment=body.comment,
            user_id=body.user,  # a label; caps and erasure go by the key (the principal)
            key_id=principal.key_id,
            key_user_id=principal.user_id,
        )
    )
    return FeedbackResponse(id=feedback_id, response_id=body.response_id, rating=body.rating)
