"""``genloop monitor report``: figures over a window, HTML with plots, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from genloop.errors import GenloopError
from genloop.monitor.alerts import raise_alert
from genloop.monitor.drift import record_series
from genloop.monitor.report import build_report, render_html
from genloop.monitor.usage import RequestRecord, record_requests
from genloop.workspace import Workspace


def _half_past() -> datetime:
    """Half past an hour that has begun: never in the future, where a row would be outside
    every window."""
    now = datetime.now(UTC)
    at = now.replace(minute=30, second=0, microsecond=0)
    return at if at < now - timedelta(minutes=1) else at - timedelta(hours=1)


NOW = _half_past()


def traffic(ws: Workspace) -> None:
    """Three hours of tiny@1 (10, 20, 30 requests; latency 10 ms · hour), 5xx in hour 2,
    a 4xx, and one request too old for a 6-hour window."""
    records = []
    for hour in (1, 2, 3):
        at = NOW - timedelta(hours=4 - hour)
        for i in range(10 * hour):
            status = 503 if hour == 2 and i < 4 else 200
            records.append(
                RequestRecord(
                    request_id=f"r{hour}-{i}",
                    endpoint="completions",
                    model_name="tiny",
                    model_version=1,
                    prompt_tokens=10,
                    completion_tokens=5,
                    latency_ms=10.0 * hour,
                    status=status,
                    flags=["pii"] if i == 0 else [],
                    created_at=at + timedelta(seconds=i),
                )
            )
    records.append(
        RequestRecord(
            request_id="bad",
            endpoint="completions",
            model_name="other",
            status=422,
            created_at=NOW - timedelta(minutes=5),
        )
    )
    records.append(
        RequestRecord(
            request_id="old",
            endpoint="completions",
            model_name="tiny",
            created_at=NOW - timedelta(hours=30),
        )
    )
    record_requests(ws, None, records, store_text=False)


def test_report_figures(workspace: Workspace) -> None:
    traffic(workspace)
    record_series(workspace, "tiny", {"psi_prompt_len": 0.05, "kl_tokens": 0.01})
    record_series(workspace, "tiny", {"psi_prompt_len": 0.31, "bias_ll_gap": 0.2})
    raise_alert(workspace, "drift", "tiny drifted", source="tiny")
    report = build_report(workspace, 6, now=NOW)
    assert report.requests == 61 and report.errors == 4 and report.client_errors == 1
    assert report.flagged == 3 and report.prompt_tokens == 600
    assert report.by_model == {"tiny": 60, "other": 1}
    assert report.by_status == {"200": 56, "422": 1, "503": 4}
    assert [h["requests"] for h in report.hourly] == [10, 20, 30, 1]
    assert [h["errors"] for h in report.hourly] == [0, 4, 0, 0]
    assert [h["p50"] for h in report.hourly[:3]] == [10.0, 20.0, 30.0]
    # 10 requests at 10 ms, 16 successful at 20 ms, 30 at 30 ms
    assert report.latency_ms == {"p50": 30.0, "p90": 30.0, "p99": 30.0}
    assert [v for _, v in report.drift["tiny"]["psi_prompt_len"]] == [0.05, 0.31]
    assert [a.message for a in report.alerts] == ["tiny drifted"]
    assert json.loads(json.dumps(report.to_dict()))["error_rate"] == pytest.approx(4 / 61)

    only = build_report(workspace, 6, model="other", now=NOW)
    assert only.requests == 1 and only.alerts == [] and "tiny" not in only.drift
    assert build_report(workspace, 48, now=NOW).requests == 62
    with pytest.raises(GenloopError, match="--hours"):
        build_report(workspace, 0)


def test_html_has_plots_and_escapes_text(workspace: Workspace) -> None:
    traffic(workspace)
    record_series(workspace, "tiny", {"psi_prompt_len": 0.05})
    record_series(workspace, "tiny", {"psi_prompt_len": 0.3})
    raise_alert(workspace, "drift", "<script>alert(1)</script>", source="tiny")
    page = render_html(build_report(workspace, 6, now=NOW))
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert page.count("src='data:image/png;base64,") == 3  # traffic, latency, drift
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing external


def test_empty_window(workspace: Workspace) -> None:
    report = build_report(workspace, 1)
    assert report.requests == 0 and report.latency_ms["p50"] is None
    page = render_html(report)
    assert "No alerts in this window" in page and "data:image/png" not in page


def test_cli_report_prints_and_writes_html(workspace: Workspace, tmp_path: Path) -> None:
    traffic(workspace)
    raise_alert(workspace, "latency", "tiny: latency 900 ms", source="tiny")
    out = tmp_path / "r.html"
    script = Path(sys.executable).with_name("genloop")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "genloop"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_")}
    env |= {"GENLOOP_HOME": str(workspace.root), "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [*cmd, "monitor", "report", "--hours", "48", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "requests" in done.stdout and "62" in done.stdout
    assert "latency 900 ms" in done.stdout and f"report written to {out}" in done.stdout
    assert out.read_text().count("data:image/png") == 2
