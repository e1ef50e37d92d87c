"""``/v1/admin/usage``: requests and tokens by key and model, and per hour."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import NAME, Admin
from genloop.serve.state import get_state

router = APIRouter()


@router.get("/usage", summary="Requests and tokens: totals by key/model, and per hour")
def usage(
    request: Request,
    _: Principal = Admin,
    hours: int = Query(24, ge=1, le=24 * 3660, description="How far back, in hours."),
    by: str = Query(
        "key,model",
        pattern=r"^(key|model|version)(,(key|model|version)){0,2}$",
        description="Group the totals by any of key, model, version.",
    ),
    model: str | None = Query(None, pattern=NAME, description="Only this model's buckets."),
) -> dict[str, Any]:
    from genloop.monitor.usage import hourly_usage, usage_summary

    ws = get_state(request).ws
    since = datetime.now(UTC) - timedelta(hours=hours)
    summary = usage_summary(ws, timedelta(hours=hours), by=list(dict.fromkeys(by.split(","))))
    hourly = hourly_usage(ws, since, model)
    return {"since": since.isoformat(), "summary": summary, "hourly": hourly}
