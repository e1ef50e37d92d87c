"""The routes of ``/v1/label``: tasks, progress, the next item and submitting a label.

Each handler calls the labeling library the CLI uses (sync routes: FastAPI runs them in
its thread pool). A second label of an item by the same annotator is a 409; a value that
does not fit the task (a label outside the label set, say) a 422; an unknown task or item
a 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import MAX_ID, NAME
from genloop.serve.api.labeling.protocol import SubmitRequest
from genloop.serve.auth import require_scope
from genloop.serve.state import get_state

router = APIRouter(prefix="/v1/label", tags=["label"])
Annotator = Depends(require_scope("label"))


def annotator(principal: Principal) -> str:
    """Who labels with this key: its user id, else its name."""
    return principal.user_id or principal.name


def task_param() -> Any:
    return Path(pattern=NAME, description="A labeling task's name.")


@router.get("/tasks", summary="Labeling tasks, newest first, with what is left for you")
def list_tasks(request: Request, principal: Principal = Annotator) -> dict[str, Any]:
    from genloop.feedback.labeling.queue import progress
    from genloop.feedback.labeling.tasks import list_tasks as _list

    ws = get_state(request).ws
    who = annotator(principal)
    data = []
    for task in _list(ws):
        state = progress(ws, task.name, who)
        data.append(task.to_dict() | {"progress": state})
    return {"object": "list", "data": data, "annotator": who}


@router.get("/tasks/{name}", summary="A task with its progress and agreement (Cohen's kappa)")
def get_task(
    request: Request, name: str = task_param(), principal: Principal = Annotator
) -> dict[str, Any]:
    from genloop.feedback.labeling.queue import progress
    from genloop.feedback.labeling.tasks import get_task as _get

    ws = get_state(request).ws
    return _get(ws, name).to_dict() | {"progress": progress(ws, name, annotator(principal))}


@router.get("/tasks/{name}/next", summary="The next item for you to label (null: none left)")
def next_item(
    request: Request,
    name: str = task_param(),
    agreement: bool = Query(
        False, description="An item someone else labeled and you have not (a second opinion)."
    ),
    principal: Principal = Annotator,
) -> dict[str, Any]:
    from genloop.feedback.labeling.queue import next_item as _next

    who = annotator(principal)
    item = _next(get_state(request).ws, name, who, agreement=agreement)
    return {"item": item.to_dict() if item is not None else None, "annotator": who}


@router.post(
    "/tasks/{name}/items/{item_id}/labels",
    summary="Submit your label of an item (once: a second one is a 409)",
    status_code=201,
)
def submit(
    request: Request,
    body: SubmitRequest,
    name: str = task_param(),
    item_id: int = Path(ge=1, le=MAX_ID, description="The item's id."),
    principal: Principal = Annotator,
) -> dict[str, Any]:
    from genloop.feedback.labeling.queue import submit_label

    info = submit_label(
        get_state(request).ws,
        name,
        item_id,
        annotator(principal),
        body.value,
        actor=principal.actor,
    )
    return info.to_dict()
