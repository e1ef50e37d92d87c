"""Alerts reach the catalog, the log and their sinks, once: an in-memory sink, and the
webhook sink against a real receiver on loopback (payload, headers, signatures)."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from genloop.errors import GenloopError, NotFoundError
from genloop.monitor.alerts import MemoryAlertSink, list_alerts, raise_alert, resolve_alert
from genloop.workspace import Workspace


def test_alert_is_stored_logged_and_listed(
    workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="genloop"):
        alert_id = raise_alert(
            workspace, "drift", "tiny drifted", {"psi": 0.4}, severity="warning", source="tiny"
        )
    assert alert_id is not None
    [info] = list_alerts(workspace)
    assert (info.id, info.kind, info.source, info.message) == (
        alert_id,
        "drift",
        "tiny",
        "tiny drifted",
    )
    assert info.details["psi"] == 0.4 and info.resolved_at is None
    assert any(f"alert {alert_id}" in r.getMessage() for r in caplog.records)
    assert list_alerts(workspace, kind="latency") == []
    assert [a.id for a in list_alerts(workspace, source="tiny", unresolved=True)] == [alert_id]


def test_the_same_alert_cools_down_until_resolved(workspace: Workspace) -> None:
    first = raise_alert(workspace, "latency", "slow", source="tiny")
    assert first is not None
    assert raise_alert(workspace, "latency", "slow again", source="tiny") is None
    assert raise_alert(workspace, "latency", "other model", source="big") is not None
    assert raise_alert(workspace, "error_rate", "errors", source="tiny") is not None
    # a different dedup key (e.g. other drifted scores) is a different alert
    assert raise_alert(workspace, "latency", "p99", source="tiny", dedup_key="p99") is not None
    resolve_alert(workspace, first)
    assert raise_alert(workspace, "latency", "slow once more", source="tiny") is not None
    assert raise_alert(workspace, "latency", "no cool-down", source="tiny", cooldown_s=0)


def test_bad_input_is_a_clear_error(workspace: Workspace) -> None:
    with pytest.raises(GenloopError, match="severity"):
        raise_alert(workspace, "drift", "x", severity="panic")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="no alert with id 99"):
        resolve_alert(workspace, 99)


def test_webhook_receiver_on_loopback_gets_the_alert(workspace: Workspace, receiver: Any) -> None:
    alert_id = raise_alert(
        workspace,
        "drift",
        "tiny drifted",
        {"scores": {"psi_prompt_len": 0.9}},
        severity="critical",
        source="tiny",
        webhook_url=receiver.url,
    )
    [body] = receiver.wait(1)
    assert body["id"] == alert_id and body["kind"] == "drift" and body["severity"] == "critical"
    assert body["source"] == "tiny" and body["message"] == "tiny drifted"
    assert body["details"]["scores"] == {"psi_prompt_len": 0.9}
    assert body["created_at"].endswith("+00:00")
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert receiver.headers[0]["User-Agent"].startswith("genloop/")


def test_an_alert_cooling_down_is_not_delivered_again(workspace: Workspace) -> None:
    sink = MemoryAlertSink()
    alert_id = raise_alert(workspace, "drift", "tiny drifted", source="tiny", sink=sink)
    assert [a.id for a in sink.alerts] == [alert_id]
    # suppressed by the cool-down: no second delivery either
    raise_alert(workspace, "drift", "again", source="tiny", sink=sink)
    assert len(sink.alerts) == 1


def test_webhooks_are_signed_when_a_secret_is_set(
    workspace: Workspace, receiver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $GENLOOP_WEBHOOK_SECRET the receiver can tell a genloop alert from a forgery
    and a fresh one from a replay; without it nothing is signed."""
    from genloop.monitor.alerts import verify_signature

    raise_alert(workspace, "drift", "unsigned", source="a", webhook_url=receiver.url)
    receiver.wait(1)
    assert "X-Genloop-Signature" not in receiver.headers[0]

    monkeypatch.setenv("GENLOOP_WEBHOOK_SECRET", "s3cret")
    raise_alert(workspace, "drift", "signed", source="b", webhook_url=receiver.url)
    receiver.wait(2)
    headers, raw = receiver.headers[1], receiver.raw[1]
    assert headers["X-Genloop-Signature"].startswith("sha256=")
    assert verify_signature("s3cret", headers, raw)
    assert not verify_signature("other", headers, raw)  # a forger without the secret
    assert not verify_signature("s3cret", headers, raw.replace(b"signed", b"forged"))
    stamp = int(headers["X-Genloop-Timestamp"])
    assert not verify_signature("s3cret", headers, raw, now=stamp + 3600)  # a replay
    assert not verify_signature("s3cret", {}, raw)


def test_an_unreachable_webhook_is_logged_not_raised(
    workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook?token=s3cret-token-value"
    from genloop.monitor.alerts import send_webhook

    with caplog.at_level(logging.WARNING, logger="genloop"):
        alert_id = raise_alert(workspace, "nan", "boom", source="run1")
        assert alert_id is not None
        send_webhook(url, {"id": alert_id}, block=True)
    warnings = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
    assert warnings and f"127.0.0.1:{port}" in warnings[0]
    assert "s3cret" not in " ".join(warnings)  # the URL's query (a token) is not logged
    assert [a.id for a in list_alerts(workspace)] == [alert_id]
