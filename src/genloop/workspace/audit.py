"""The audit log: who did which admin action to what. It never holds content."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from genloop.workspace.tables import AuditEvent


def record(session: Session, actor: str, action: str, target: str, **details: Any) -> AuditEvent:
    event = AuditEvent(actor=actor, action=action, target=target, details=details)
    session.add(event)
    return event
