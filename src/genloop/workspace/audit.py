"""The audit log: who did which admin action to what. It never holds content."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from genloop.workspace.tables import AuditEvent
from genloop.workspace.workspace import Workspace


def record(session: Session, actor: str, action: str, target: str, **details: Any) -> AuditEvent:
    event = AuditEvent(actor=actor, action=action, target=target, details=details)
    session.add(event)
    return event


def list_events(
    ws: Workspace, *, action: str | None = None, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    """Audit events, newest first (only ``action`` ones, when given)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    with ws.catalog.session() as s:
        return [
            {
                "id": e.id,
                "at": e.at.isoformat() if e.at is not None else None,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "details": e.details or {},
            }
            for e in s.scalars(query)
        ]
