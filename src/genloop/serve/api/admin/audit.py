"""``/v1/admin/audit`` and ``/v1/admin/overview``: the audit log, and the dashboard's
counts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import Admin, Page, limit_query, offset_query
from genloop.serve.state import get_state
from genloop.workspace import audit
from genloop.workspace import overview as catalog_overview

router = APIRouter()


@router.get("/audit", summary="The audit log: admin actions and erasures", response_model=Page)
def audit_log(
    request: Request,
    _: Principal = Admin,
    action: str | None = Query(None, max_length=64),
    limit: int = limit_query(),
    offset: int = offset_query(),
) -> Page:
    events = audit.list_events(get_state(request).ws, action=action, limit=limit, offset=offset)
    return Page(data=events)


@router.get("/overview", summary="Counts for a dashboard")
def overview(request: Request, _: Principal = Admin) -> dict[str, Any]:
    return catalog_overview.counts(get_state(request).ws)
