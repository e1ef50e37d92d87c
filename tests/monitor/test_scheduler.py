"""The monitor thread: periodic drift checks and scheduled bias probes on a real model."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import pytest

from genloop.config import EvalConfig, MonitorConfig
from genloop.evaluate.run import evaluate_model
from genloop.evaluate.store import list_evaluations
from genloop.monitor.drift import series
from genloop.monitor.scheduler import MonitorWorker
from genloop.monitor.usage import RequestRecord, record_requests
from genloop.workspace import Workspace, registry


def wait_for(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_drift_checks_run_on_schedule_for_the_served_models(workspace: Workspace) -> None:
    records = [
        RequestRecord(
            request_id=uuid.uuid4().hex,
            endpoint="completions",
            model_name=name,
            prompt_tokens=5 + i % 7,
            completion_tokens=3 + i % 5,
        )
        for name in ("a", "b")
        for i in range(40)
    ]
    record_requests(workspace, None, records, store_text=False)
    served = [("a", None)]
    cfg = MonitorConfig(reference_window=20, window=20, check_interval_s=0.2)
    worker = MonitorWorker(workspace, cfg, models=lambda: served)
    worker.start()
    try:
        wait_for(lambda: "a" in worker.last_reports)
        served.append(("b", None))  # a model loaded later is checked from then on
        wait_for(lambda: "b" in worker.last_reports)
        checks = len(series(workspace, "a")["psi_prompt_len"])
        wait_for(lambda: len(series(workspace, "a")["psi_prompt_len"]) > checks)
    finally:
        worker.stop()
    assert not worker.running
    assert worker.last_reports["a"].status == "ok"


def test_a_failing_check_is_logged_and_the_thread_goes_on(
    workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def models() -> list[tuple[str, int | None]]:
        calls.append(1)
        raise RuntimeError("registry unavailable")

    worker = MonitorWorker(workspace, MonitorConfig(check_interval_s=0.1), models=models)
    with caplog.at_level(logging.ERROR, logger="genloop"):
        worker.start()
        wait_for(lambda: len(calls) >= 2)
        worker.observe("x", None, 10.0, failed=False)  # anomaly detection still runs
        wait_for(lambda: worker.anomalies._models.get("x") is not None)
        worker.stop()
    assert any("drift check failed" in r.getMessage() for r in caplog.records)


def test_bias_probes_run_on_schedule_and_are_tracked(
    trained: tuple[Workspace, str], tmp_path: Path
) -> None:
    ws, ref = trained
    info = registry.resolve(ws, ref)
    probes = tmp_path / "probes.jsonl"
    probes.write_text(
        json.dumps(
            {
                "id": "g1",
                "axis": "gender",
                "template": "The {X} sat on the",
                "groups": {"male": ["man"], "female": ["woman"]},
            }
        )
        + "\n"
    )
    before = len(list_evaluations(ws, info.id))
    cfg = MonitorConfig(check_interval_s=3600, bias_interval_s=0.3)
    worker = MonitorWorker(
        ws,
        cfg,
        models=[(info.name, info.version)],
        evaluate=evaluate_model,
        bias_eval=EvalConfig(bias_suite_path=probes, max_new_tokens=4),
    )
    worker.start()
    try:
        wait_for(lambda: len(series(ws, info.name).get("bias_ll_gap", [])) >= 2, timeout=120)
    finally:
        worker.stop()
    evaluations = list_evaluations(ws, info.id)
    assert len(evaluations) - before >= 2
    assert evaluations[0].suite == "bias"
    points = series(ws, info.name)["bias_ll_gap"]
    assert points[0][1] == evaluations[-1 - before].metrics["bias_ll_gap"]
    assert points[0][1] == points[1][1]  # greedy: the same model scores the same
    assert worker.last_bias[ref]["bias_negative_rate_gap"] >= 0


def test_the_server_purges_data_past_retention_on_a_schedule(workspace: Workspace) -> None:
    """genloop serve's monitor thread runs the retention purge at start and then every
    ``purge_interval_s``: requests older than ``security.retention_days`` go, recent ones
    stay, and the purge is in the audit log."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select, update

    from genloop.workspace.tables import AuditEvent, RequestLog

    ids = [uuid.uuid4().hex for _ in range(4)]
    record_requests(
        workspace,
        None,
        [RequestRecord(request_id=i, endpoint="completions", model_name="a") for i in ids],
        store_text=False,
    )
    old = datetime.now(UTC) - timedelta(days=40)
    with workspace.catalog.session() as s:
        s.execute(update(RequestLog).where(RequestLog.id.in_(ids[:3])).values(created_at=old))
    cfg = MonitorConfig(check_interval_s=3600, purge_interval_s=0.2)
    worker = MonitorWorker(workspace, cfg, models=[], retention_days=30)
    worker.start()
    try:
        wait_for(lambda: worker.last_purge is not None)
        assert worker.last_purge is not None and worker.last_purge["requests"] == 3

        def purges() -> int:
            with workspace.catalog.session() as s:
                events = s.scalars(select(AuditEvent).where(AuditEvent.action == "privacy.purge"))
                return len(list(events))

        wait_for(lambda: purges() >= 2)  # and again, every purge_interval_s
        # the audit row commits inside the purge, just before last_purge is set: wait for it
        wait_for(lambda: worker.last_purge == {"feedback": 0, "requests": 0, "log_files": 0})
    finally:
        worker.stop()
    with workspace.catalog.session() as s:
        assert list(s.scalars(select(RequestLog.id))) == [ids[3]]
        actors = {
            e.actor
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "privacy.purge"))
        }
    assert actors == {"monitor"}

    idle = MonitorWorker(workspace, MonitorConfig(purge_interval_s=0.2), models=[])
    idle.start()  # no retention period: nothing is ever purged
    time.sleep(1.5)
    idle.stop()
    assert idle.last_purge is None
