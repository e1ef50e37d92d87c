"""``genloop monitor report``: traffic, latency, errors, drift and alerts over a window.

:func:`build_report` reads the catalog (requests, the monitor runs' series, alerts);
:func:`render_html` turns the result into one self-contained HTML file with matplotlib
plots as PNG data URIs (traffic and errors per hour, latency percentiles per hour, drift
scores and bias metrics over time), like the evaluation reports. :func:`monitoring_series`
is the web UI's view of the same log (buckets of any width). Both take their latency
percentiles from :mod:`genloop.monitor.stats`.

Both count every logged request, the *rejected* ones included: requests the server
refused before they reached a model (401, 404, 413, 429 …; logged by
:mod:`genloop.serve.http_metrics` with no model name). So "N requests, M errors" is what
clients were answered, not only what the models saw; the report also breaks the rejected
ones down by reason. A ``model`` filter keeps only that model's requests (rejected ones
name no model).
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from genloop.errors import GenloopError
from genloop.monitor.alerts import AlertInfo, list_alerts
from genloop.monitor.drift import series
from genloop.monitor.stats import latency_sample, percentiles
from genloop.workspace import registry, runs
from genloop.workspace.tables import RequestLog
from genloop.workspace.workspace import Workspace

MAX_ROWS = 500_000  # requests read for one report
REJECTED_MODEL = ""  # the model name of a request refused before reaching a model
MAX_HOURS = 24 * 366
PERCENTILES = (50, 90, 99)


@dataclass
class MonitorReport:
    start: datetime
    end: datetime
    model: str | None
    requests: int = 0
    errors: int = 0  # status >= 500
    client_errors: int = 0  # 400-499
    flagged: int = 0  # with guardrail flags
    rejected: int = 0  # refused before reaching a model (no model name)
    by_reason: dict[str, int] = field(default_factory=dict)  # rejected ones, by reason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: dict[str, float | None] = field(default_factory=dict)  # p50, p90, p99
    by_model: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    hourly: list[dict[str, Any]] = field(default_factory=list)
    drift: dict[str, dict[str, list[tuple[datetime, float]]]] = field(default_factory=dict)
    alerts: list[AlertInfo] = field(default_factory=list)
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "model": self.model,
            "requests": self.requests,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "flagged": self.flagged,
            "rejected": self.rejected,
            "by_reason": self.by_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": self.latency_ms,
            "by_model": self.by_model,
            "by_status": self.by_status,
            "hourly": [h | {"hour": h["hour"].isoformat()} for h in self.hourly],
            "drift": {
                model: {k: [(t.isoformat(), v) for t, v in pts] for k, pts in keys.items()}
                for model, keys in self.drift.items()
            },
            "alerts": [a.to_dict() for a in self.alerts],
            "truncated": self.truncated,
        }


def build_report(
    ws: Workspace, hours: float = 24.0, *, model: str | None = None, now: datetime | None = None
) -> MonitorReport:
    """The figures of the last ``hours`` hours (of one model, or all)."""
    if not 0 < hours <= MAX_HOURS:
        raise GenloopError(f"--hours must be in (0, {MAX_HOURS}], not {hours}")
    end = now or datetime.now(UTC)
    start = end - timedelta(hours=hours)
    report = MonitorReport(start=start, end=end, model=model)
    query = (
        select(
            RequestLog.created_at,
            RequestLog.model_name,
            RequestLog.status,
            RequestLog.latency_ms,
            RequestLog.prompt_tokens,
            RequestLog.completion_tokens,
            RequestLog.flags,
        )
        .where(RequestLog.created_at >= start, RequestLog.created_at <= end)
        .order_by(RequestLog.created_at.desc())
        .limit(MAX_ROWS + 1)
    )
    if model is not None:
        query = query.where(RequestLog.model_name == model)
    with ws.catalog.session() as s:
        rows = s.execute(query).all()
    monitored = runs.run_names(ws, kind="monitor")
    if len(rows) > MAX_ROWS:
        rows, report.truncated = rows[:MAX_ROWS], True

    latencies: list[float] = []
    per_hour: dict[datetime, dict[str, Any]] = {}
    by_model: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    for at, name, status, latency, prompt, completion, flags in rows:
        report.requests += 1
        if name == REJECTED_MODEL:
            report.rejected += 1
        else:
            by_model[name] += 1
        by_status[str(status)] += 1
        report.prompt_tokens += prompt or 0
        report.completion_tokens += completion or 0
        report.flagged += bool(flags)
        hour = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        bucket = per_hour.setdefault(hour, {"requests": 0, "errors": 0, "latencies": []})
        bucket["requests"] += 1
        if status >= 500:
            report.errors += 1
            bucket["errors"] += 1
        elif status >= 400:
            report.client_errors += 1
        sample = latency_sample(status, latency)
        if sample is not None:
            latencies.append(sample)
            bucket["latencies"].append(sample)
    report.latency_ms = percentiles(latencies, PERCENTILES)
    if report.rejected and model is None:
        report.by_reason = _rejected_reasons(ws, start, end)
    report.by_model = dict(by_model.most_common())
    report.by_status = dict(sorted(by_status.items()))
    report.hourly = [
        {"hour": hour, "requests": b["requests"], "errors": b["errors"]}
        | percentiles(b["latencies"], PERCENTILES)
        for hour, b in sorted(per_hour.items())
    ]

    names = set(by_model) | {n.removeprefix("monitor:") for n in monitored}
    for name in sorted(names):
        if model is not None and name != model:
            continue
        points = series(ws, name, since=start)
        if points:
            report.drift[name] = points
    report.alerts = [
        a
        for a in list_alerts(ws, since=end - start, limit=1000)
        if model is None or a.source in (model, "") or a.source.startswith(f"{model}@")
    ]
    return report


def _rejected_reasons(ws: Workspace, start: datetime, end: datetime) -> dict[str, int]:
    """The rejected requests of a window by reason (``unauthorized`` …), most first."""
    query = (
        select(RequestLog.params)
        .where(
            RequestLog.model_name == REJECTED_MODEL,
            RequestLog.created_at >= start,
            RequestLog.created_at <= end,
        )
        .limit(MAX_ROWS)
    )
    reasons: Counter[str] = Counter()
    with ws.catalog.session() as s:
        for (params,) in s.execute(query):
            reasons[str((params or {}).get("reason") or "unknown")] += 1
    return dict(reasons.most_common())


UI_PERCENTILES = (50, 95, 99)


def monitoring_series(
    ws: Workspace,
    hours: int,
    bucket_minutes: int,
    *,
    model: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The last ``hours`` hours of logged requests (of one model, or all) in buckets of
    ``bucket_minutes`` (count, errors = status ≥ 400, split into ``client_errors`` 4xx and
    ``server_errors`` 5xx and, of those, ``rejected``: refused before reaching a model;
    latency p50/p95/p99 in ms), the window's error counts ``by_status`` and refusals
    ``by_reason`` (most first; all models only), and each model's drift series by check
    time; times in ISO 8601."""
    width = timedelta(minutes=bucket_minutes)
    until = now or datetime.now(UTC)
    since = until - timedelta(hours=hours)
    query = select(
        RequestLog.created_at, RequestLog.latency_ms, RequestLog.status, RequestLog.model_name
    ).where(RequestLog.created_at >= since)
    if model is not None:
        query = query.where(RequestLog.model_name == model)
    buckets: dict[int, tuple[list[float], list[int], list[bool]]] = {}
    with ws.catalog.session() as s:
        for at, latency, status, name in s.execute(query):
            index = int((at.astimezone(UTC) - since) / width)
            latencies, statuses, rejected = buckets.setdefault(index, ([], [], []))
            statuses.append(status)
            rejected.append(name == REJECTED_MODEL)
            sample = latency_sample(status, latency)
            if sample is not None:
                latencies.append(sample)
    points = []
    by_status: Counter[int] = Counter()
    for index in sorted(buckets):
        latencies, statuses, rejected = buckets[index]
        figures = percentiles(latencies, UI_PERCENTILES)
        by_status.update(st for st in statuses if st >= 400)
        points.append(
            {
                "start": (since + index * width).isoformat(),
                "requests": len(statuses),
                "errors": sum(1 for st in statuses if st >= 400),
                "client_errors": sum(1 for st in statuses if 400 <= st < 500),
                "server_errors": sum(1 for st in statuses if st >= 500),
                "rejected": sum(rejected),
                **{f"latency_p{q}_ms": figures[f"p{q}"] for q in UI_PERCENTILES},
            }
        )
    drift = {}
    for name in sorted([model] if model else registry.model_names(ws)):
        found = series(ws, name, since=since)
        if found:
            drift[name] = {
                key: [[at.isoformat(), value] for at, value in values]
                for key, values in found.items()
            }
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "bucket_minutes": bucket_minutes,
        "requests": points,
        "by_status": {str(st): n for st, n in sorted(by_status.items())},
        "by_reason": _rejected_reasons(ws, since, until) if model is None else {},
        "drift": drift,
    }


# ---------------------------------------------------------------------------- HTML

_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.92em}"
    "th{background:#f4f4f4}img{max-width:100%}.crit{color:#b00}.warn{color:#a60}"
)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def traffic_plot(report: MonitorReport) -> str | None:
    if not report.hourly:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3))
    ax = fig.subplots()
    hours = [h["hour"] for h in report.hourly]
    width = 0.9 / 24  # days: matplotlib's date unit
    bars: dict[str, Any] = {"width": width, "align": "edge"}
    ax.bar(hours, [h["requests"] for h in report.hourly], label="requests", **bars)
    ax.bar(hours, [h["errors"] for h in report.hourly], color="#c33", label="5xx", **bars)
    ax.set_xlim(report.start, report.end)  # type: ignore[arg-type]
    ax.set_ylabel("requests per hour")
    ax.legend(loc="upper left")
    fig.autofmt_xdate()
    return _png(fig)


def latency_plot(report: MonitorReport) -> str | None:
    points = [h for h in report.hourly if h["p50"] is not None]
    if not points:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3))
    ax = fig.subplots()
    for p in PERCENTILES:
        ax.plot(
            [h["hour"] for h in points], [h[f"p{p}"] for h in points], marker=".", label=f"p{p}"
        )
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper left")
    fig.autofmt_xdate()
    return _png(fig)


def series_plot(title: str, keys: dict[str, list[tuple[datetime, float]]]) -> str | None:
    if not keys:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3))
    ax = fig.subplots()
    for key, points in sorted(keys.items()):
        times: list[Any] = [t for t, _ in points]  # matplotlib plots datetimes as dates
        ax.plot(times, [v for _, v in points], marker=".", label=key)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    fig.autofmt_xdate()
    return _png(fig)


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r)
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def summary_rows(report: MonitorReport) -> list[list[Any]]:
    d = report.to_dict()
    rate = d["error_rate"]
    return [
        ["requests", report.requests],
        [
            "server errors (5xx)",
            f"{report.errors}" + (f" ({rate:.2%})" if rate is not None else ""),
        ],
        ["client errors (4xx)", report.client_errors],
        ["rejected before a model", report.rejected],
        ["guardrail-flagged", report.flagged],
        ["prompt tokens", report.prompt_tokens],
        ["generated tokens", report.completion_tokens],
        *[[f"latency {k} (ms)", v] for k, v in report.latency_ms.items()],
        ["alerts", len(report.alerts)],
    ]


def render_html(report: MonitorReport) -> str:
    scope = f" — {report.model}" if report.model else ""
    title = html.escape(
        f"genloop monitor report{scope}: {report.start:%Y-%m-%d %H:%M} → "
        f"{report.end:%Y-%m-%d %H:%M} UTC"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_CSS}</style></head><body><h1>{title}</h1>",
        _table(["figure", "value"], summary_rows(report)),
    ]
    if report.truncated:
        parts.append(f"<p>Only the newest {MAX_ROWS:,} requests are counted.</p>")
    if report.by_model:
        parts += [
            "<h2>Models</h2>",
            _table(["model", "requests"], [[k, v] for k, v in report.by_model.items()]),
        ]
    for heading, img in (("Traffic", traffic_plot(report)), ("Latency", latency_plot(report))):
        if img:
            parts.append(f"<h2>{heading}</h2><img alt='{heading}' src='{img}'>")
    if report.by_status:
        parts += [
            "<h2>Status codes</h2>",
            _table(["status", "count"], [[k, v] for k, v in report.by_status.items()]),
        ]
    if report.by_reason:
        parts += [
            "<h2>Rejected requests</h2>",
            _table(["reason", "count"], [[k, v] for k, v in report.by_reason.items()]),
        ]
    for model, keys in report.drift.items():
        drift = {k: v for k, v in keys.items() if k.startswith(("psi_", "kl_"))}
        bias = {k: v for k, v in keys.items() if k.startswith("bias_")}
        parts.append(f"<h2>Drift and bias: {html.escape(model)}</h2>")
        for name, group in (("drift scores", drift), ("bias probes", bias)):
            img = series_plot(f"{model}: {name}", group)
            if img:
                parts.append(f"<img alt='{html.escape(name)}' src='{img}'>")
            latest = [
                [k, f"{pts[-1][1]:.4g}", pts[-1][0].strftime("%Y-%m-%d %H:%M")]
                for k, pts in sorted(group.items())
            ]
            if latest:
                parts.append(_table([name, "latest", "at (UTC)"], latest))
    parts.append("<h2>Alerts</h2>")
    if report.alerts:
        rows = [
            [
                a.id,
                a.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                a.severity,
                a.kind,
                a.source,
                a.message,
                "resolved" if a.resolved_at else "open",
            ]
            for a in report.alerts
        ]
        parts.append(
            _table(["id", "at (UTC)", "severity", "kind", "source", "message", "state"], rows)
        )
    else:
        parts.append("<p>No alerts in this window.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
