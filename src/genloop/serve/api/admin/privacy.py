"""``/v1/admin/privacy``: what is held about a user: export it, erase it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import Admin
from genloop.serve.state import get_state

router = APIRouter()


class UserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=128, description="The user, as requests name it.")


@router.post("/privacy/export", summary="Everything held about a user (right of access)")
def privacy_export(
    request: Request, body: UserRequest, principal: Principal = Admin
) -> dict[str, Any]:
    from genloop.security.privacy import export_user

    state = get_state(request)
    return export_user(state.ws, body.user_id, state.cipher, actor=principal.actor)


@router.post("/privacy/erase", summary="Erase what is held about a user (right to erasure)")
async def privacy_erase(
    request: Request, body: UserRequest, principal: Principal = Admin
) -> dict[str, Any]:
    from starlette.concurrency import run_in_threadpool

    from genloop.security.privacy import erase_user

    state = get_state(request)
    await state.recorder.flush()  # requests answered a moment ago are erased too
    counts = await run_in_threadpool(
        erase_user, state.ws, body.user_id, principal.actor, cipher=state.cipher
    )
    return {"erased": counts}
