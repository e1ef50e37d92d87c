"""``/v1/admin/monitoring``: request rate, latency percentiles, errors and drift over time
(:func:`genloop.monitor.report.monitoring_series`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import NAME, Admin
from genloop.serve.state import get_state

router = APIRouter()


@router.get("/monitoring", summary="Request rate, latency percentiles, errors and drift over time")
def monitoring(
    request: Request,
    _: Principal = Admin,
    hours: int = Query(24, ge=1, le=24 * 90, description="How far back, in hours."),
    bucket_minutes: int = Query(60, ge=1, le=24 * 60, description="Width of one bucket."),
    model: str | None = Query(None, pattern=NAME, description="Only this model's requests."),
) -> dict[str, Any]:
    """Buckets of logged requests (count, errors = status ≥ 400, of which ``rejected``:
    refused before reaching a model, such as 401, 404, 413, 429; latency p50/p95/p99 in ms)
    and each model's drift series (``genloop monitor drift`` scores, by check time)."""
    from genloop.monitor.report import monitoring_series

    return monitoring_series(get_state(request).ws, hours, bucket_minutes, model=model)
