"""``/v1/admin/alerts``: alerts, and resolving one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import Admin, Page, id_param, limit_query
from genloop.serve.state import get_state

router = APIRouter()


@router.get("/alerts", summary="Alerts, newest first", response_model=Page)
def list_alerts(
    request: Request,
    _: Principal = Admin,
    unresolved: bool = False,
    kind: str | None = Query(None, max_length=64),
    limit: int = limit_query(),
) -> Page:
    from genloop.monitor.alerts import list_alerts as _list

    alerts = _list(get_state(request).ws, kind=kind, unresolved=unresolved, limit=limit)
    return Page(data=[a.to_dict() for a in alerts])


@router.post("/alerts/{alert_id}/resolve", summary="Mark an alert resolved")
def resolve_alert(
    request: Request, alert_id: int = id_param(), _: Principal = Admin
) -> dict[str, Any]:
    from genloop.monitor.alerts import resolve_alert as _resolve

    return _resolve(get_state(request).ws, alert_id).to_dict()
