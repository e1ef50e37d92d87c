"""``/v1/admin/evaluations``: evaluations, their suites' results and reports."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from genloop.errors import NotFoundError
from genloop.security.keys import Principal
from genloop.serve.api.admin.common import REF, Admin, Page, id_param, limit_query
from genloop.serve.state import get_state

router = APIRouter()


@router.get("/evaluations", summary="Evaluations, newest first", response_model=Page)
def list_evaluations(
    request: Request,
    _: Principal = Admin,
    model: str | None = Query(None, pattern=REF, max_length=200, description="NAME@VERSION"),
    limit: int = limit_query(),
) -> Page:
    from genloop.evaluate.store import list_evaluations as _list
    from genloop.workspace import registry

    ws = get_state(request).ws
    model_id = registry.resolve(ws, model).id if model else None
    return Page(data=[r.to_dict() for r in _list(ws, model_id)[:limit]])


@router.get("/evaluations/{evaluation_id}", summary="One evaluation with its suites' results")
def get_evaluation(
    request: Request, evaluation_id: int = id_param(), _: Principal = Admin
) -> dict[str, Any]:
    from dataclasses import asdict

    from genloop.evaluate.store import get_evaluation as _get
    from genloop.evaluate.store import load_results

    ws = get_state(request).ws
    record = _get(ws, evaluation_id)
    out = record.to_dict()
    out["results"] = [asdict(r) for r in load_results(ws, record)] if record.report else []
    return out


@router.get("/evaluations/{evaluation_id}/report", summary="The evaluation report (Markdown)")
def get_evaluation_report(
    request: Request, evaluation_id: int = id_param(), _: Principal = Admin
) -> dict[str, Any]:
    from genloop.evaluate.report import REPORT_MD
    from genloop.evaluate.store import get_evaluation as _get

    ws = get_state(request).ws
    record = _get(ws, evaluation_id)
    if record.report is None:
        raise NotFoundError(f"evaluation {evaluation_id} has no report")
    path = ws.store.file(record.report, REPORT_MD)
    if not path.is_file():
        raise NotFoundError(f"evaluation {evaluation_id} has no report")
    return {"id": evaluation_id, "markdown": path.read_text(encoding="utf-8")}
