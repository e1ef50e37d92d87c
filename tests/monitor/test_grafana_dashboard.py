"""``deploy/grafana/genloop.json``: every panel asks Prometheus only for metrics genloop
exports (names taken from the live registry of :class:`ServingMetrics`, so a renamed
metric fails here instead of leaving an empty panel), and every panel has a title and the
dashboard's datasource variable."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from genloop.monitor.metrics import GPU_GAUGES, LABELS, ServingMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "genloop.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# a metric name in PromQL: genloop's own and the process collector's
METRIC = re.compile(r"(?<![\w:])(genloop:[A-Za-z0-9_:]+|process_[A-Za-z0-9_]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> set[str]:
    """Every sample name a genloop server's /metrics can hold (GPU gauges included: they
    appear only on a CUDA machine)."""
    metrics = ServingMetrics()
    metrics.watch_alerts(dict)
    names = set(GPU_GAUGES)
    for family in metrics.registry.collect():
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row holds its panels
    return out


def test_every_query_names_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    names = exported()
    assert "genloop:http_requests_total" in names  # the registry was read
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            found = set(METRIC.findall(target["expr"]))
            assert found, f"{panel['title']!r}: no metric in {target['expr']!r}"
            assert found <= names, f"{panel['title']!r} asks for {sorted(found - names)}"
            used |= found
    # what the dashboard is for: refusals, latency percentiles, engine state, swaps, alerts
    assert {
        "genloop:http_requests_total",
        "genloop:http_request_duration_seconds_bucket",
        "genloop:auth_failures_total",
        "genloop:time_to_first_token_seconds_bucket",
        "genloop:inter_token_latency_seconds_bucket",
        "genloop:num_requests_running",
        "genloop:num_requests_waiting",
        "genloop:generation_tokens_total",
        "genloop:model_swaps_total",
        "genloop:alerts_open",
    } <= used


def test_every_panel_has_a_title_and_the_datasource(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert panel.get("title"), panel.get("id")
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == DATASOURCE, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} covers {cells.get((x, y))!r}"
                cells[(x, y)] = panel["title"]


def test_variables_datasource_and_model(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    model = variables["model_name"]
    assert model["type"] == "query" and model["datasource"] == DATASOURCE
    assert "model_name" in LABELS  # genloop labels its series by model
    (metric,) = METRIC.findall(model["query"]["query"])
    assert metric in exported()
    # the panels about models filter by it
    filtered = [
        t["expr"]
        for p in panels(dashboard)
        for t in p.get("targets", [])
        if 'model_name=~"$model_name"' in t["expr"]
    ]
    assert len(filtered) >= 10
