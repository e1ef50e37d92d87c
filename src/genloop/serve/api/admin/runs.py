"""``/v1/admin/runs``: runs and their metric series (:mod:`genloop.workspace.runs`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import RUN_ID, Admin, Page, limit_query, offset_query
from genloop.serve.state import get_state
from genloop.workspace import runs

router = APIRouter()


@router.get("/runs", summary="Runs, newest first", response_model=Page)
def list_runs(
    request: Request,
    _: Principal = Admin,
    kind: str | None = Query(None, max_length=32),
    status: str | None = Query(None, max_length=16),
    limit: int = limit_query(),
    offset: int = offset_query(),
) -> Page:
    found = runs.list_runs(
        get_state(request).ws, kind=kind, status=status, limit=limit, offset=offset
    )
    return Page(data=[r.to_dict() for r in found])


@router.get("/runs/{run_id}", summary="One run with its config and metric series")
def get_run(
    request: Request,
    run_id: str = Path(pattern=RUN_ID),
    _: Principal = Admin,
    keys: str | None = Query(
        None, max_length=1000, description="Comma-separated metric keys (default: all)."
    ),
    max_points: int = Query(2000, ge=10, le=100_000, description="Points per series, at most."),
    with_time: bool = Query(
        False, description="Add each point's time (Unix seconds, UTC): [step, value, time]."
    ),
) -> dict[str, Any]:
    wanted = [k.strip() for k in keys.split(",")] if keys else None
    return runs.run_details(get_state(request).ws, run_id, wanted, max_points, with_time=with_time)
