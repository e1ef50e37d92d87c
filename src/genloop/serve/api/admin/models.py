"""``/v1/admin/models``: model versions and aliases: diff, promote, roll back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import (
    ALIAS,
    MAX_ID,
    NAME,
    REF,
    Admin,
    Page,
    name_param,
    version_param,
)
from genloop.serve.state import get_state
from genloop.workspace import registry

router = APIRouter()


@router.get("/models", summary="Model versions with aliases and metrics", response_model=Page)
def list_model_versions(
    request: Request,
    _: Principal = Admin,
    name: str | None = Query(None, pattern=NAME),
) -> Page:
    infos = registry.list_models(get_state(request).ws, name)
    return Page(data=[i.to_dict() for i in infos])


@router.get("/models/diff", summary="What differs between two versions")
def diff_models(
    request: Request,
    a: str = Query(pattern=REF, max_length=200, description="First ref (NAME@VERSION)."),
    b: str = Query(pattern=REF, max_length=200, description="Second ref."),
    _: Principal = Admin,
) -> dict[str, Any]:
    return registry.diff(get_state(request).ws, a, b)


@router.get("/models/{name}/versions/{version}", summary="One model version")
def get_model_version(
    request: Request, name: str = name_param(), version: int = version_param(), _: Principal = Admin
) -> dict[str, Any]:
    return registry.resolve(get_state(request).ws, f"{name}@{version}").to_dict()


@router.get("/models/{name}/aliases", summary="Alias history: every promotion and rollback")
def alias_history(request: Request, name: str = name_param(), _: Principal = Admin) -> Page:
    return Page(data=registry.alias_history(get_state(request).ws, name))


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=MAX_ID, description="The version the alias should name.")
    alias: str = Field("production", pattern=ALIAS)
    reason: str = Field("", max_length=1000)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = Field("production", pattern=ALIAS)
    reason: str = Field("", max_length=1000)


@router.post("/models/{name}/promote", summary="Point NAME@ALIAS at a version (live swap)")
def promote(
    request: Request,
    body: PromoteRequest,
    name: str = name_param(),
    principal: Principal = Admin,
) -> dict[str, Any]:
    info = registry.promote(
        get_state(request).ws,
        f"{name}@{body.version}",
        body.alias,
        actor=principal.actor,
        reason=body.reason,
    )
    return info.to_dict()


@router.post("/models/{name}/rollback", summary="Point NAME@ALIAS back at its previous version")
def rollback(
    request: Request,
    name: str = name_param(),
    body: RollbackRequest = Body(default_factory=RollbackRequest),  # noqa: B008
    principal: Principal = Admin,
) -> dict[str, Any]:
    info = registry.rollback(
        get_state(request).ws, name, body.alias, actor=principal.actor, reason=body.reason
    )
    return info.to_dict()
