"""Alerts: a log line, a catalog row (the UI lists them) and delivery to alert sinks.

Every detector (drift, latency and error-rate anomalies, NaN and loss spikes in training)
ends in :func:`raise_alert`. The same alert does not fire again while an unresolved one
with the same ``dedup_key`` (default: kind + source) is younger than ``cooldown_s``: a
check that runs every minute against a drifted model writes one alert, not sixty an hour.

A new alert then goes to its sinks (:class:`AlertSink`: one ``deliver`` method):
:class:`WebhookSink` POSTs it (``webhook_url`` is the shorthand for one), and
:class:`MemoryAlertSink` keeps it in a list, the double tests check what was sent with.

The webhook gets the alert as JSON (``{"id", "kind", "severity", "source", "message",
"details", "created_at"}``), posted from a background thread with a short timeout and no
redirects; a failure is logged, never raised, so an unreachable receiver cannot stall a
check or a training step.

Signed webhooks. With ``$GENLOOP_WEBHOOK_SECRET`` set, every POST carries
``X-Genloop-Timestamp`` (Unix seconds) and ``X-Genloop-Signature: sha256=<hex>``, the
HMAC-SHA256 under that secret of ``"<timestamp>." + body`` (the exact bytes sent), so a
receiver can check that an alert comes from genloop and is fresh (:func:`verify_signature`
does it; reject timestamps older than a few minutes against replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import select

from genloop.errors import GenloopError, NotFoundError
from genloop.workspace.tables import Alert, utcnow
from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
DEFAULT_COOLDOWN_S = 900.0
WEBHOOK_TIMEOUT_S = 5.0
ENV_WEBHOOK_SECRET = "GENLOOP_WEBHOOK_SECRET"  # noqa: S105 (the variable's name)
SIGNATURE_HEADER = "X-Genloop-Signature"
TIMESTAMP_HEADER = "X-Genloop-Timestamp"
MAX_SIGNATURE_AGE_S = 300
MAX_MESSAGE = 2000


@dataclass
class AlertInfo:
    """One alert as the CLI (``--json``), the admin API and the UI see it."""

    id: int
    kind: str
    severity: str
    source: str
    message: str
    created_at: datetime
    details: dict[str, Any] = field(default_factory=dict)
    resolved_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "severity": self.severity,
            "source": self.source,
            "message": self.message,
            "details": self.details,
            "created_at": self.created_at.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }


class AlertSink(Protocol):
    """Where a new alert goes besides the catalog and the log. ``deliver`` must not raise
    or block: a check or a training step waits for it."""

    def deliver(self, alert: AlertInfo) -> None: ...


@dataclass(frozen=True)
class WebhookSink:
    """POSTs each alert as JSON to ``url`` from a background thread (:func:`send_webhook`),
    signed when ``$GENLOOP_WEBHOOK_SECRET`` is set."""

    url: str

    def deliver(self, alert: AlertInfo) -> None:
        send_webhook(self.url, alert.to_dict())


class MemoryAlertSink:
    """Keeps every alert delivered to it, in order: the test double for a receiver."""

    def __init__(self) -> None:
        self.alerts: list[AlertInfo] = []

    def deliver(self, alert: AlertInfo) -> None:
        self.alerts.append(alert)


def _info(row: Alert) -> AlertInfo:
    return AlertInfo(
        id=row.id,
        kind=row.kind,
        severity=row.severity,
        source=row.source,
        message=row.message,
        created_at=row.created_at,
        details=dict(row.details or {}),
        resolved_at=row.resolved_at,
    )


def raise_alert(
    ws: Workspace,
    kind: str,
    message: str,
    details: dict[str, Any] | None = None,
    severity: Severity = "warning",
    source: str = "",
    webhook_url: str | None = None,
    *,
    dedup_key: str | None = None,
    cooldown_s: float = DEFAULT_COOLDOWN_S,
    quiet: bool = False,
    sink: AlertSink | None = None,
) -> int | None:
    """Record an alert; returns its id, or None when an equal one is still cooling down.

    ``details`` must be JSON-serializable and hold no personal data (scores, thresholds,
    counts). ``webhook_url``: POST the alert there as well (a :class:`WebhookSink`);
    ``sink``: deliver it there too.
    ``quiet``: log it at debug level, when the caller reports the same problem itself (a
    diverged training run raises its own one-line error).
    """
    if severity not in SEVERITIES:
        raise GenloopError(f"unknown alert severity {severity!r} (one of {', '.join(SEVERITIES)})")
    key = dedup_key or f"{kind}:{source}"
    details = {**(details or {}), "dedup_key": key}
    message = message[:MAX_MESSAGE]
    now = utcnow()
    with ws.catalog.session(write_lock=True) as s:
        if cooldown_s > 0:
            recent = s.scalars(
                select(Alert).where(
                    Alert.kind == kind,
                    Alert.source == source,
                    Alert.resolved_at.is_(None),
                    Alert.created_at >= now - timedelta(seconds=cooldown_s),
                )
            ).all()
            if any((r.details or {}).get("dedup_key") == key for r in recent):
                log.debug("alert %s from %s suppressed (cooling down)", kind, source)
                return None
        row = Alert(
            kind=kind,
            severity=severity,
            source=source,
            message=message,
            details=details,
            created_at=now,
        )
        s.add(row)
        s.flush()
        info = _info(row)
    level = logging.ERROR if severity == "critical" else logging.WARNING
    log.log(
        logging.DEBUG if quiet else level,
        "alert %d [%s]: %s",
        info.id,
        kind,
        message,
        extra={"alert_id": info.id, "alert_kind": kind, "alert_source": source},
    )
    sinks: list[AlertSink] = [WebhookSink(webhook_url)] if webhook_url else []
    if sink is not None:
        sinks.append(sink)
    for target in sinks:
        target.deliver(info)
    return info.id


def send_webhook(url: str, payload: dict[str, Any], *, block: bool = False) -> threading.Thread:
    """POST ``payload`` as JSON to ``url`` in a daemon thread (returned; ``block`` joins it)."""
    thread = threading.Thread(
        target=_post, args=(url, payload), name="genloop-alert-webhook", daemon=True
    )
    thread.start()
    if block:
        thread.join(WEBHOOK_TIMEOUT_S + 1)
    return thread


def _post(url: str, payload: dict[str, Any]) -> None:
    import httpx

    import genloop

    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    headers = {"User-Agent": f"genloop/{genloop.__version__}", "Content-Type": "application/json"}
    secret = os.environ.get(ENV_WEBHOOK_SECRET)
    if secret:
        timestamp = str(int(time.time()))
        headers[TIMESTAMP_HEADER] = timestamp
        headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
    try:
        response = httpx.post(
            url,
            content=body,
            timeout=WEBHOOK_TIMEOUT_S,
            follow_redirects=False,
            headers=headers,
        )
        if response.status_code >= 300:
            log.warning(
                "alert webhook %s answered %d for alert %s",
                _host(url),
                response.status_code,
                payload.get("id"),
            )
    except httpx.HTTPError as exc:
        log.warning(
            "alert webhook %s failed for alert %s: %s",
            _host(url),
            payload.get("id"),
            type(exc).__name__,
        )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 under ``secret`` of ``timestamp`` + ``"."`` + ``body``."""
    message = timestamp.encode("ascii") + b"." + body
    return "sha256=" + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str,
    headers: dict[str, str],
    body: bytes,
    *,
    max_age_s: float = MAX_SIGNATURE_AGE_S,
    now: float | None = None,
) -> bool:
    """Whether a webhook POST (its headers and raw body) was signed with ``secret`` no
    more than ``max_age_s`` ago: what a receiver runs before trusting an alert."""
    found = {k.lower(): v for k, v in headers.items()}
    timestamp = found.get(TIMESTAMP_HEADER.lower(), "")
    signature = found.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or not signature:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _host(url: str) -> str:
    """The URL without its path and query (which may hold a token)."""
    import httpx

    try:
        u = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid url>"
    return f"{u.scheme}://{u.host}" + (f":{u.port}" if u.port else "")


def list_alerts(
    ws: Workspace,
    *,
    since: timedelta | None = None,
    kind: str | None = None,
    source: str | None = None,
    unresolved: bool = False,
    limit: int = 200,
) -> list[AlertInfo]:
    """Alerts, newest first."""
    query = select(Alert).order_by(Alert.created_at.desc(), Alert.id.desc()).limit(limit)
    if since is not None:
        query = query.where(Alert.created_at >= datetime.now(UTC) - since)
    if kind is not None:
        query = query.where(Alert.kind == kind)
    if source is not None:
        query = query.where(Alert.source == source)
    if unresolved:
        query = query.where(Alert.resolved_at.is_(None))
    with ws.catalog.session() as s:
        return [_info(row) for row in s.scalars(query)]


def open_alert_counts(ws: Workspace) -> dict[tuple[str, str], int]:
    """Unresolved alerts by (kind, severity): the ``genloop:alerts_open`` gauge."""
    from sqlalchemy import func

    query = (
        select(Alert.kind, Alert.severity, func.count())
        .where(Alert.resolved_at.is_(None))
        .group_by(Alert.kind, Alert.severity)
    )
    with ws.catalog.session() as s:
        return {(kind, severity): int(n) for kind, severity, n in s.execute(query)}


def resolve_alert(ws: Workspace, alert_id: int) -> AlertInfo:
    """Mark an alert resolved (an equal alert may fire again at once)."""
    with ws.catalog.session() as s:
        row = s.get(Alert, alert_id)
        if row is None:
            raise NotFoundError(f"no alert with id {alert_id}")
        if row.resolved_at is None:
            row.resolved_at = utcnow()
        return _info(row)
