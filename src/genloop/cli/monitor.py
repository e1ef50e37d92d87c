"""``genloop monitor``: usage, reports, alerts, drift checks and reference profiles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json, print_table

if TYPE_CHECKING:
    from genloop.config import MonitorConfig

app = typer.Typer(
    help="Watch served models: usage per key and model, drift and anomaly alerts, reports.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config whose monitor section sets thresholds."),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a key: monitor.window=200.")
]


def _monitor_config(config: Path | None, set_: list[str] | None) -> MonitorConfig:
    from genloop.config import GenloopConfig, MonitorConfig, load_config, parse_config

    if config is not None:
        return load_config(config, set_ or []).monitor
    if set_:
        return parse_config({}, set_, cls=GenloopConfig).monitor
    return MonitorConfig()


@app.command()
def usage(
    since: Annotated[str, typer.Option(help="How far back: 30m, 24h, 7d, 2w.")] = "7d",
    by: Annotated[
        str, typer.Option(help="Group by key, model and/or version, comma-separated.")
    ] = "key,model",
    json: JsonOpt = False,
) -> None:
    """Requests and tokens per API key and per model (whole hours)."""
    from genloop.monitor.usage import parse_since, usage_summary

    window = parse_since(since)
    groups = [b.strip() for b in by.split(",") if b.strip()]
    with open_workspace() as ws:
        rows = usage_summary(ws, window, by=groups)
    if json:
        print_json(rows)
        return
    if not rows:
        console.print(f"no requests in the last {since}", highlight=False)
        return
    columns = [c for c in ("key_prefix", "key_name", "model", "version") if c in rows[0]]
    print_table(
        f"usage, last {since}",
        [*columns, "requests", "prompt tokens", "generated tokens"],
        [
            [
                *(r[c] if r[c] is not None else "-" for c in columns),
                r["requests"],
                r["prompt_tokens"],
                r["completion_tokens"],
            ]
            for r in rows
        ],
    )


@app.command()
def report(
    hours: Annotated[float, typer.Option(help="The window: the last N hours.")] = 24.0,
    model: Annotated[str | None, typer.Option(help="Only this model (its name).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the HTML \\[default: <workspace>/reports/monitor-TIME.html].",
            show_default=False,
        ),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Print traffic, latency percentiles, errors, drift scores and alerts for the window,
    and write them as HTML with plots."""
    from datetime import UTC, datetime

    from genloop.monitor.report import build_report, render_html, summary_rows

    with open_workspace() as ws:
        rep = build_report(ws, hours, model=model)
        path = out or ws.root / "reports" / f"monitor-{datetime.now(UTC):%Y%m%d-%H%M%S}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(rep), encoding="utf-8")
    if json:
        print_json(rep.to_dict() | {"html": str(path)})
        return
    print_table(
        f"last {hours:g} h" + (f", {model}" if model else ""),
        ["figure", "value"],
        summary_rows(rep),
    )
    for name, keys in rep.drift.items():
        latest = [[k, f"{pts[-1][1]:.4g}"] for k, pts in sorted(keys.items())]
        print_table(f"drift and bias, {name} (latest)", ["score", "value"], latest)
    if rep.alerts:
        print_table(
            "alerts",
            ["id", "at (UTC)", "kind", "source", "message"],
            [
                [a.id, a.created_at.strftime("%m-%d %H:%M"), a.kind, a.source, a.message]
                for a in rep.alerts[:20]
            ],
        )
    console.print(f"report written to {path}", highlight=False, markup=False)


@app.command()
def alerts(
    since: Annotated[str, typer.Option(help="How far back: 30m, 24h, 7d, 2w.")] = "7d",
    kind: Annotated[
        str | None, typer.Option(help="Only this kind: drift, latency, error_rate, nan …")
    ] = None,
    source: Annotated[str | None, typer.Option(help="Only this source (model or run id).")] = None,
    open_only: Annotated[bool, typer.Option("--open", help="Only unresolved alerts.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many.")] = 100,
    json: JsonOpt = False,
) -> None:
    """List alerts, newest first."""
    from genloop.monitor.alerts import list_alerts
    from genloop.monitor.usage import parse_since

    window = parse_since(since)
    with open_workspace() as ws:
        found = list_alerts(
            ws, since=window, kind=kind, source=source, unresolved=open_only, limit=limit
        )
    if json:
        print_json([a.to_dict() for a in found])
        return
    if not found:
        console.print(f"no alerts in the last {since}", highlight=False)
        return
    print_table(
        None,
        ["id", "at (UTC)", "severity", "kind", "source", "message", "state"],
        [
            [
                a.id,
                a.created_at.strftime("%Y-%m-%d %H:%M"),
                a.severity,
                a.kind,
                a.source,
                a.message,
                "resolved" if a.resolved_at else "open",
            ]
            for a in found
        ],
    )


@app.command()
def resolve(alert_id: Annotated[int, typer.Argument(help="The alert's id.")]) -> None:
    """Mark an alert resolved."""
    from genloop.monitor.alerts import resolve_alert

    with open_workspace() as ws:
        info = resolve_alert(ws, alert_id)
    console.print(f"alert {info.id} resolved", highlight=False)


@app.command()
def drift(
    model: Annotated[str, typer.Argument(help="The served model's name.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    alert: Annotated[
        bool, typer.Option("--alert/--no-alert", help="Raise an alert when drift is found.")
    ] = True,
    json: JsonOpt = False,
) -> None:
    """Check now whether recent requests drifted from the reference profile."""
    from genloop.monitor.drift import DriftMonitor

    cfg = _monitor_config(config, set_)
    with open_workspace() as ws:
        rep = DriftMonitor().check(ws, cfg, model, alert=alert)
    if json:
        print_json(rep.to_dict())
        return
    console.print(
        f"{model}: {rep.status} ({rep.recent_requests} recent requests, reference "
        f"{rep.reference_requests})",
        highlight=False,
    )
    if rep.message:
        console.print(rep.message, highlight=False, markup=False)
    if rep.scores:
        rows = []
        for name, value in rep.scores.items():
            limit = rep.thresholds["kl" if name.startswith("kl_") else "psi"]
            rows.append([name, f"{value:.4f}", limit, "DRIFT" if name in rep.drifted else ""])
        print_table(None, ["score", "value", "threshold", ""], rows)
    if rep.alert_id is not None:
        console.print(f"alert {rep.alert_id} raised", highlight=False)


@app.command()
def profile(
    model: Annotated[str, typer.Argument(help="The served model's name.")],
    reset: Annotated[
        bool,
        typer.Option("--reset", help="Start over: the next requests become the traffic reference."),
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show (building what it can) or reset the model's drift reference profile."""
    from genloop.monitor.drift import DriftMonitor, reset_profile

    cfg = _monitor_config(config, set_)
    with open_workspace() as ws:
        data = reset_profile(ws, model) if reset else DriftMonitor().profile(ws, cfg, model)
    if json:
        print_json(data)
        return
    training, traffic = data.get("training"), data.get("traffic")
    rows: list[list[object]] = []
    if training:
        k, n = training["rates"]["unk_rate"]
        rows.append(["training data", training.get("dataset"), f"{training['documents']} docs"])
        rows.append(["training unknown-token rate", f"{k / n:.4%}" if n else "-", f"{n} tokens"])
    else:
        rows.append(["training data", "unavailable", "(model unknown or not from genloop data)"])
    if traffic:
        rows.append(["traffic reference", f"{traffic['requests']} requests", traffic["until"]])
        for key, hist in traffic["numeric"].items():
            edges = ", ".join(f"{e:.3g}" for e in hist["edges"])
            rows.append([f"{key} bin edges", edges, ""])
    else:
        since = data.get("traffic_since") or "the first request"
        rows.append(
            ["traffic reference", f"not taken yet ({cfg.reference_window} requests)", since]
        )
    print_table(f"reference profile of {model}", ["part", "value", ""], rows)
