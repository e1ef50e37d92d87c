"""``/v1/admin/keys``: API keys: list, create (shown once), set limits, revoke."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import Admin, Page, id_param
from genloop.serve.state import get_state

router = APIRouter()


@router.get("/keys", summary="API keys (never the keys themselves)", response_model=Page)
def list_keys(
    request: Request,
    _: Principal = Admin,
    user_id: str | None = Query(None, max_length=128),
) -> Page:
    from genloop.security.keys import list_keys as _list

    return Page(data=[k.to_dict() for k in _list(get_state(request).ws.catalog, user_id=user_id)])


_LIMIT = "unset or null: the server's default (serve.rate_limit); 0: no limit for this key"


class KeyLimits(BaseModel):
    """A key's own limits; a field left out is not changed (create: the server's default)."""

    model_config = ConfigDict(extra="forbid")
    requests_per_min: int | None = Field(None, ge=0, le=2**31 - 1, description=_LIMIT)
    tokens_per_min: int | None = Field(None, ge=0, le=2**31 - 1, description=_LIMIT)
    tokens_per_day: int | None = Field(None, ge=0, le=10**15 - 1, description=_LIMIT)
    tokens_per_month: int | None = Field(None, ge=0, le=10**15 - 1, description=_LIMIT)


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    scopes: list[Literal["generate", "feedback", "label", "metrics", "admin"]] = Field(
        min_length=1, max_length=5
    )
    expires_in: str | None = Field(
        None, max_length=16, description="Lifetime, e.g. 30d, 12h, 2w; unset: no expiry."
    )
    user_id: str | None = Field(None, min_length=1, max_length=128)
    limits: KeyLimits | None = Field(
        None, description="This key's own limits, overriding serve.rate_limit."
    )


@router.post("/keys", summary="Create a key; the response is the only time it is shown")
def create_key(
    request: Request, body: CreateKeyRequest, principal: Principal = Admin
) -> dict[str, Any]:
    from genloop.security.keys import create_key as _create
    from genloop.security.keys import parse_duration
    from genloop.security.ratelimit import Limits

    expires = parse_duration(body.expires_in) if body.expires_in else None
    created = _create(
        get_state(request).ws.catalog,
        name=body.name,
        scopes=list(body.scopes),
        expires_in=expires,
        user_id=body.user_id,
        limits=Limits(**body.limits.model_dump()) if body.limits else None,
        actor=principal.actor,
    )
    return created.info.to_dict() | {"key": created.plaintext}


@router.delete("/keys/{key_id}", summary="Revoke a key")
def revoke_key(
    request: Request, key_id: int = id_param(), principal: Principal = Admin
) -> dict[str, Any]:
    from genloop.security.keys import revoke_key as _revoke

    return _revoke(get_state(request).ws.catalog, key_id, actor=principal.actor).to_dict()


@router.patch("/keys/{key_id}/limits", summary="Set a key's own rate limits and quotas")
def set_limits(
    request: Request, body: KeyLimits, key_id: int = id_param(), principal: Principal = Admin
) -> dict[str, Any]:
    """The fields sent change (null: back to the server's default; 0: no limit for this
    key); servers apply them within a few seconds."""
    from genloop.security.keys import set_key_limits

    changes = body.model_dump(exclude_unset=True)
    return set_key_limits(
        get_state(request).ws.catalog, key_id, changes, actor=principal.actor
    ).to_dict()
