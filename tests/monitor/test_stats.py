"""One percentile definition for the request log: the web UI and the report agree."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from genloop.monitor.report import build_report, monitoring_series
from genloop.monitor.stats import latency_sample, percentile, percentiles
from genloop.monitor.usage import RequestRecord, record_requests
from genloop.workspace import Workspace


def test_percentile_is_numpys_linear_interpolation() -> None:
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        values = sorted(rng.uniform(1, 500) for _ in range(n))
        for q in (0, 50, 90, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    assert percentiles([], (50, 99)) == {"p50": None, "p99": None}
    assert percentiles([1.0, 2.0, 3.0, 4.0], (50,)) == {"p50": 2.5}


def test_only_successful_requests_with_a_latency_count() -> None:
    assert latency_sample(200, 12.5) == 12.5
    assert latency_sample(404, 12.5) is None and latency_sample(503, 12.5) is None
    assert latency_sample(200, None) is None and latency_sample(200, float("inf")) is None


def test_the_ui_and_the_report_show_the_same_p99(workspace: Workspace) -> None:
    now = datetime.now(UTC)
    rng = random.Random(1)
    records = [
        RequestRecord(
            request_id=f"r{i}",
            endpoint="completions",
            model_name="tiny",
            latency_ms=rng.uniform(5, 900),
            status=500 if i % 17 == 0 else 200,
            created_at=now - timedelta(minutes=50) + timedelta(seconds=i),
        )
        for i in range(120)
    ]
    record_requests(workspace, None, records, store_text=False)
    report = build_report(workspace, 1, now=now)
    [bucket] = monitoring_series(workspace, 1, 60, now=now)["requests"]
    assert bucket["requests"] == 120
    assert bucket["latency_p50_ms"] == report.latency_ms["p50"]
    assert bucket["latency_p99_ms"] == report.latency_ms["p99"]
    assert bucket["latency_p99_ms"] is not None
    # the errors split by class, and counted by status for the window (the UI's table)
    series = monitoring_series(workspace, 1, 60, now=now)
    assert bucket["server_errors"] == bucket["errors"] == 8 and bucket["client_errors"] == 0
    assert series["by_status"] == {"500": 8}
