"""The queue: the next item for an annotator, submitting a label, progress.

The queue gives items in their task's order. An annotator gets an item they have not
labeled that still needs labels: it has fewer than the task's ``overlap`` labels (with
overlap 2, two annotators go through the same items and every item measures agreement).
``agreement=True`` asks instead for an item someone else labeled and this annotator has
not, whatever the overlap: a second opinion for Cohen's kappa.

A label is stored once per annotator and item: the catalog's unique constraint on (item,
annotator) refuses a second submission (:class:`~genloop.errors.ConflictError`, HTTP 409),
so nothing is counted twice, even when two submissions race. Whether the label equals the
item's pre-label is recorded (``prelabel_accepted``); :func:`progress` reports the share
accepted as the pre-labels' accuracy.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from genloop.errors import ConflictError, NotFoundError
from genloop.feedback.labeling.agreement import agreement
from genloop.feedback.labeling.tasks import (
    ItemInfo,
    check_annotator,
    check_value,
    item_info,
    same_value,
    task_row,
)
from genloop.workspace import audit
from genloop.workspace.tables import Label, LabelItem
from genloop.workspace.workspace import Workspace


@dataclass
class LabelInfo:
    id: int
    task: str
    item_id: int
    annotator: str
    value: dict[str, Any]
    prelabel_accepted: bool | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


def next_item(
    ws: Workspace, task: str, annotator: str, *, agreement: bool = False
) -> ItemInfo | None:
    """The first item in the task's order for ``annotator`` (module docstring), or None
    when there is nothing left for them."""
    annotator = check_annotator(annotator)
    with ws.catalog.session() as s:
        t = task_row(s, task)
        mine = exists().where(Label.item_id == LabelItem.id, Label.annotator == annotator)
        query = select(LabelItem).where(LabelItem.task_id == t.id, ~mine)
        if agreement:
            others = exists().where(Label.item_id == LabelItem.id, Label.annotator != annotator)
            query = query.where(others)
        else:
            count = select(func.count()).where(Label.item_id == LabelItem.id).scalar_subquery()
            query = query.where(count < t.overlap)
        row = s.scalars(query.order_by(LabelItem.position).limit(1)).first()
        return item_info(row, t.name) if row is not None else None


def submit_label(
    ws: Workspace,
    task: str,
    item_id: int,
    annotator: str,
    value: object,
    *,
    actor: str | None = None,
) -> LabelInfo:
    """Store ``annotator``'s label of item ``item_id`` of ``task``.

    A value that does not fit the task is a LabelError (422); an unknown task or item a
    NotFoundError (404); a second label of the same item by the same annotator a
    ConflictError (409), and the first one stays as it was.
    """
    annotator = check_annotator(annotator)
    refused = ConflictError(
        f"item {item_id} of task {task} is already labeled by {annotator}; a second "
        "submission is refused (the first one stands)"
    )
    try:
        with ws.catalog.session() as s:
            t = task_row(s, task)
            item = s.get(LabelItem, item_id)
            if item is None or item.task_id != t.id:
                raise NotFoundError(f"task {task} has no item {item_id}")
            checked = check_value(t.kind, t.label_set, item.payload, value, "label")
            taken = s.scalar(
                select(Label.id).where(Label.item_id == item.id, Label.annotator == annotator)
            )
            if taken is not None:
                raise refused
            accepted = None if item.prelabel is None else same_value(t.kind, checked, item.prelabel)
            row = Label(
                item_id=item.id,
                task_id=t.id,
                annotator=annotator,
                value=checked,
                prelabel_accepted=accepted,
            )
            s.add(row)
            s.flush()  # the unique constraint answers here when a submission raced this one
            audit.record(
                s,
                actor or f"annotator:{annotator}",
                "label.submit",
                f"label_task:{t.name}",
                item=item.id,
                annotator=annotator,
                prelabel_accepted=accepted,
            )
            return LabelInfo(row.id, t.name, item.id, annotator, checked, accepted, row.created_at)
    except DBIntegrityError:
        with ws.catalog.session() as s:
            mine = and_(Label.item_id == item_id, Label.annotator == annotator)
            if s.scalar(select(Label.id).where(mine)) is not None:
                raise refused from None
        raise


def labels_of(ws: Workspace, task: str) -> list[LabelInfo]:
    """Every label of a task, in the order they were given."""
    with ws.catalog.session() as s:
        t = task_row(s, task)
        rows = s.scalars(select(Label).where(Label.task_id == t.id).order_by(Label.id)).all()
        return [
            LabelInfo(
                r.id,
                t.name,
                r.item_id,
                r.annotator,
                dict(r.value),
                r.prelabel_accepted,
                r.created_at,
            )
            for r in rows
        ]


def progress(ws: Workspace, task: str, annotator: str | None = None) -> dict[str, Any]:
    """Where a task stands: items labeled and complete (``overlap`` labels), labels per
    annotator, the pre-labels' accuracy (the share of labels that accepted them) and the
    agreement of each pair of annotators; with ``annotator``, what is left for them."""
    with ws.catalog.session() as s:
        t = task_row(s, task)
        items = s.scalar(select(func.count()).where(LabelItem.task_id == t.id)) or 0
        prelabeled = (
            s.scalar(
                select(func.count()).where(
                    LabelItem.task_id == t.id, LabelItem.prelabel.is_not(None)
                )
            )
            or 0
        )
        rows = s.execute(
            select(Label.item_id, Label.annotator, Label.value, Label.prelabel_accepted)
            .where(Label.task_id == t.id)
            .order_by(Label.id)
        ).all()
        kind, overlap, name = t.kind, t.overlap, t.name
    per_item = Counter(r.item_id for r in rows)
    by_annotator: dict[str, dict[int, Any]] = defaultdict(dict)
    for r in rows:
        by_annotator[r.annotator][r.item_id] = r.value
    reviewed = [r.prelabel_accepted for r in rows if r.prelabel_accepted is not None]
    out: dict[str, Any] = {
        "task": name,
        "kind": kind,
        "items": items,
        "overlap": overlap,
        "labeled_items": len(per_item),
        "complete_items": sum(1 for n in per_item.values() if n >= overlap),
        "labels": len(rows),
        "annotators": {a: len(v) for a, v in sorted(by_annotator.items())},
        "prelabels": {
            "items": prelabeled,
            "reviewed": len(reviewed),
            "accepted": sum(reviewed),
            "accuracy": sum(reviewed) / len(reviewed) if reviewed else None,
        },
        "agreement": agreement(kind, by_annotator),
    }
    if annotator is not None:
        annotator = check_annotator(annotator)
        mine = set(by_annotator.get(annotator, {}))
        # items the queue still gives them: not theirs, fewer than `overlap` labels
        open_elsewhere = sum(1 for i, n in per_item.items() if i not in mine and n < overlap)
        out["you"] = {
            "annotator": annotator,
            "labeled": len(mine),
            "remaining": items - len(per_item) + open_elsewhere,
        }
    return out
