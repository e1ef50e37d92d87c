"""Every response counted: a live server gets a known mix of answers (200, 400, 401, 404,
413, 422, 429), and ``/metrics``, the request log and the admin API must each agree
exactly with what was sent, refused requests included. Plus the key-guessing alert."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from genloop.feedback.labeling.tasks import create_task
from genloop.monitor.report import build_report
from genloop.security.keys import create_key, set_key_limits
from genloop.workspace import Workspace
from genloop.workspace.tables import RequestLog

from .conftest import LiveServer, auth, make_workspace, running_server, serve_config

UNKNOWN_KEY = "gl_" + "A" * 43  # well-formed, in no catalog
LABELS = "/v1/label/tasks/{name}/items/{item_id}/labels"


@pytest.fixture(scope="module")
def mix(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]
) -> Iterator[dict[str, Any]]:
    """A server that was sent the mix; what it was sent (expected counts) and the server."""
    root = tmp_path_factory.mktemp("httpmetrics")
    ws = make_workspace(root / "ws", model_dirs)
    file = root / "reviews.jsonl"
    file.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("good", "bad")))
    create_task(ws, "reviews", "classification", file=file, labels=["pos", "neg"])
    made = {
        "admin": create_key(ws.catalog, name="ops", scopes=["admin"]),
        "gen": create_key(ws.catalog, name="client", scopes=["generate"]),
        "annotator": create_key(ws.catalog, name="annotator", scopes=["label"]),
        "limited": create_key(ws.catalog, name="limited", scopes=["generate"]),
    }
    set_key_limits(ws.catalog, made["limited"].info.id, {"requests_per_min": 2})
    keys = {k: v.plaintext for k, v in made.items()}
    cfg = serve_config(max_body_bytes=4096)
    with running_server(ws, cfg, keys) as live:
        sent, gap = send_mix(live)
        yield {"live": live, "ws": ws, "sent": sent, "keys": made, "stream_gap_s": gap}
    ws.close()


def send_mix(live: LiveServer) -> tuple[Counter[tuple[str, str, int]], float]:
    """Send the mix; returns (route template, method, status) → how many were answered so,
    and the seconds between the first and the last chunk of a streamed answer."""
    sent: Counter[tuple[str, str, int]] = Counter()

    def expect(r: httpx.Response, route: str, status: int) -> None:
        assert r.status_code == status, (route, r.status_code, r.text)
        sent[(route, r.request.method, status)] += 1

    k = live.keys
    with httpx.Client(base_url=live.url, timeout=60) as c:
        for _ in range(3):
            expect(c.get("/v1/models", headers=auth(k["gen"])), "/v1/models", 200)
        done = c.post(
            "/v1/completions",
            headers=auth(k["gen"]),
            json={"model": "tiny", "prompt": "Hello", "max_tokens": 2},
        )
        expect(done, "/v1/completions", 200)
        # a stream: the server must time it to its last byte, not to its first
        chat = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 40,
            "stream": True,
            "temperature": 0,
        }
        with c.stream("POST", "/v1/chat/completions", headers=auth(k["gen"]), json=chat) as r:
            chunks = r.iter_bytes()
            next(chunks)
            first = time.perf_counter()
            for _ in chunks:
                pass
            stream_gap_s = time.perf_counter() - first
        expect(r, "/v1/chat/completions", 200)
        huge_n = {"model": "tiny", "prompt": "Hello", "n": 1e9}
        refused = c.post("/v1/completions", headers=auth(k["gen"]), json=huge_n)
        expect(refused, "/v1/completions", 400)
        # refused by the model's handler, which logs it itself: it must be logged once
        too_long = {"model": "tiny", "prompt": "Hello", "max_tokens": 100_000}
        long_refused = c.post("/v1/completions", headers=auth(k["gen"]), json=too_long)
        expect(long_refused, "/v1/completions", 400)
        for headers in ({}, {}, auth("not-a-key"), auth(UNKNOWN_KEY), auth(UNKNOWN_KEY)):
            expect(c.get("/v1/models", headers=headers), "/v1/models", 401)
        expect(c.get("/v1/nope", headers=auth(k["gen"])), "unmatched", 404)
        # (the web UI's static files answer any other path: 405 to a POST)
        expect(c.post("/v1/nope", headers=auth(k["gen"]), json={}), "unmatched", 405)
        expect(c.get("/v1/models/nosuch", headers=auth(k["gen"])), "/v1/models/{model}", 404)
        big = {"model": "tiny", "prompt": "x" * 5000}
        expect(c.post("/v1/completions", headers=auth(k["gen"]), json=big), "/v1/completions", 413)
        nxt = c.get("/v1/label/tasks/reviews/next", headers=auth(k["annotator"]))
        expect(nxt, "/v1/label/tasks/{name}/next", 200)
        url = f"/v1/label/tasks/reviews/items/{nxt.json()['item']['id']}/labels"
        bad = c.post(url, headers=auth(k["annotator"]), json={"value": {"label": "meh"}})
        expect(bad, LABELS, 422)
        for status in (200, 200, 429):
            expect(c.get("/v1/models", headers=auth(k["limited"])), "/v1/models", status)
    return sent, stream_gap_s


def scrape(live: LiveServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    with live.client(live.keys["admin"]) as c:
        text = c.get("/metrics").text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def wait_for_rows(ws: Workspace, n: int, timeout: float = 15.0) -> list[RequestLog]:
    deadline = time.monotonic() + timeout
    while True:
        with ws.catalog.session() as s:
            rows = list(s.query(RequestLog))
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_metrics_count_every_response_by_route_template(mix: dict[str, Any]) -> None:
    sent: Counter[tuple[str, str, int]] = mix["sent"]
    samples = scrape(mix["live"])
    counted: Counter[tuple[str, str, int]] = Counter()
    for s, v in samples["genloop:http_requests_total"]:
        if s["route"] not in ("/ready", "/metrics"):  # the fixture's probes, our scrapes
            counted[(s["route"], s["method"], int(s["status"]))] += int(v)
    assert counted == sent
    # the reason word of each refusal
    reasons = {
        (s["route"], s["status"], s["reason"]): v
        for s, v in samples["genloop:http_requests_total"]
        if int(s["status"]) >= 400
    }
    assert reasons[("/v1/models", "401", "missing_key")] == 2
    assert reasons[("/v1/models", "401", "malformed_key")] == 1
    assert reasons[("/v1/models", "401", "invalid_key")] == 2
    assert reasons[("/v1/completions", "413", "too_large")] == 1
    assert reasons[("/v1/completions", "400", "invalid_request")] == 2
    assert reasons[("/v1/models", "429", "busy")] == 1
    assert reasons[(LABELS, "422", "invalid_request")] == 1
    # the latency histogram saw each response once
    durations = {
        (s["route"], s["method"], int(s["status"])): v
        for s, v in samples["genloop:http_request_duration_seconds_count"]
        if s["route"] not in ("/ready", "/metrics")
    }
    assert durations == {key: float(n) for key, n in sent.items()}
    (streamed,) = [
        v
        for s, v in samples["genloop:http_request_duration_seconds_sum"]
        if s["route"] == "/v1/chat/completions"
    ]
    # timed to the last byte: at least most of the time the client spent receiving the
    # chunks (timed to the first, it would be a small part of it); half leaves room for
    # the client thread's own delays on a busy machine
    assert streamed >= 0.5 * mix["stream_gap_s"] > 0
    # 401s by the key's public prefix, never more of it
    failures = {s["key_prefix"]: v for s, v in samples["genloop:auth_failures_total"]}
    assert failures == {"missing": 2.0, "malformed": 1.0, UNKNOWN_KEY[:11]: 2.0}
    # the model-level counter still counts only what reached a model
    reached = sum(v for _, v in samples["genloop:requests_total"])
    assert reached == 3.0  # two served, one refused by the model's handler


def test_request_log_holds_every_refusal_without_its_body(mix: dict[str, Any]) -> None:
    sent: Counter[tuple[str, str, int]] = mix["sent"]
    ws: Workspace = mix["ws"]
    errors = {key: n for key, n in sent.items() if key[2] >= 400}
    rows = wait_for_rows(ws, sum(errors.values()) + 2)  # + the two served completions
    served = [r for r in rows if r.model_name]
    rejected = [r for r in rows if not r.model_name]
    # the handler logged the 400 it gave itself, with its model: not a second time here
    assert sorted((r.endpoint, r.model_name, r.status) for r in served) == [
        ("chat.completions", "tiny", 200),
        ("completions", "tiny", 200),
        ("completions", "tiny", 400),
    ]
    errors[("/v1/completions", "POST", 400)] -= 1
    logged = Counter((r.endpoint, r.params["method"], r.status) for r in rejected)
    assert logged == errors
    for row in rejected:
        assert row.prompt_enc is None and row.response_enc is None and row.flags == []
        assert set(row.params) == {"rejected", "method", "reason", "key_prefix"}
        assert row.latency_ms is not None and row.latency_ms >= 0
    prefixes = Counter(r.params["key_prefix"] for r in rejected if r.status == 401)
    assert prefixes == {None: 3, UNKNOWN_KEY[:11]: 2}
    limited = mix["keys"]["limited"].info
    (throttled,) = [r for r in rejected if r.status == 429]
    assert throttled.api_key_id == limited.id
    assert throttled.params["key_prefix"] == limited.prefix
    # the day's JSON-lines log has them too, with no key and no body
    text = "".join(p.read_text() for p in (ws.root / "logs").glob("requests-*.jsonl"))
    assert UNKNOWN_KEY not in text and "not-a-key" not in text and "x" * 100 not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert sum(1 for line in lines if line.get("rejected")) == sum(errors.values())


def test_admin_api_and_report_count_refusals(mix: dict[str, Any]) -> None:
    sent: Counter[tuple[str, str, int]] = mix["sent"]
    ws: Workspace = mix["ws"]
    n_errors = sum(n for key, n in sent.items() if key[2] >= 400)
    wait_for_rows(ws, n_errors + 2)
    live: LiveServer = mix["live"]
    with live.client(live.keys["admin"]) as c:
        mon = c.get("/v1/admin/monitoring", params={"hours": 1, "bucket_minutes": 60}).json()
    # what the UI shows as "N requests, M errors"
    assert sum(p["requests"] for p in mon["requests"]) == n_errors + 2
    assert sum(p["errors"] for p in mon["requests"]) == n_errors
    assert sum(p["rejected"] for p in mon["requests"]) == n_errors - 1  # one reached tiny
    report = build_report(ws, hours=1)  # genloop monitor report
    assert (report.requests, report.client_errors, report.errors) == (n_errors + 2, n_errors, 0)
    assert report.rejected == n_errors - 1
    by_status: Counter[str] = Counter({"200": 2})  # the completions; GETs are not logged
    for (_, _, status), n in sent.items():
        if status >= 400:
            by_status[str(status)] += n
    assert report.by_status == dict(by_status)
    assert report.by_reason == {
        "invalid_key": 2,
        "missing_key": 2,
        "not_found": 2,
        "method_not_allowed": 1,
        "malformed_key": 1,
        "invalid_request": 2,
        "too_large": 1,
        "busy": 1,
    }
    assert report.by_model == {"tiny": 3}


def test_key_guessing_raises_one_alert_and_resolves_it(
    tmp_path: Path, model_dirs: tuple[Path, Path]
) -> None:
    from genloop.monitor.alerts import list_alerts

    ws = make_workspace(tmp_path / "ws", model_dirs)
    # more than 5 401s within 2 s (150 a minute) is key guessing
    cfg = serve_config()
    cfg.monitor.auth_failures_per_min = 150.0
    cfg.monitor.auth_failure_window_s = 2.0
    keys = {"gen": create_key(ws.catalog, name="c", scopes=["generate"]).plaintext}
    with running_server(ws, cfg, keys) as live, httpx.Client(base_url=live.url) as c:
        for i in range(12):
            guess = "gl_" + f"{i:08d}" + "B" * 35
            assert c.get("/v1/models", headers=auth(guess)).status_code == 401
        alert = wait_for(lambda: [a for a in list_alerts(ws) if a.kind == "auth_failures"])
        assert len(alert) == 1
        assert alert[0].details["count"] > 5 and alert[0].details["threshold"] == 5
        assert "guessing" in alert[0].message and "gl_00000000" in alert[0].message
        assert "B" * 35 not in alert[0].message  # a prefix, never the guessed key
        # it stops: resolved once the window holds few failures; no second alert
        done = wait_for(
            lambda: [a for a in list_alerts(ws) if a.kind == "auth_failures" and a.resolved_at]
        )
        assert [a.id for a in done] == [alert[0].id]
        assert c.get("/v1/models", headers=auth(keys["gen"])).status_code == 200
    assert len([a for a in list_alerts(ws) if a.kind == "auth_failures"]) == 1
    ws.close()


def wait_for(fn: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = fn()
        if found or time.monotonic() > deadline:
            assert found, "timed out"
            return found
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("header", "label"),
    [
        (None, "missing"),
        (b"", "missing"),
        (b"Bearer ", "missing"),
        (b"Bearer gl_short", "malformed"),
        (b"Basic dXNlcjpwYXNz", "malformed"),
        (b"Bearer " + UNKNOWN_KEY.encode(), UNKNOWN_KEY[:11]),
        (b"bearer  " + UNKNOWN_KEY.encode() + b" ", UNKNOWN_KEY[:11]),
        (b"Bearer " + UNKNOWN_KEY[:-1].encode() + b"!", "malformed"),
    ],
)
def test_key_label_shows_at_most_the_public_prefix(header: bytes | None, label: str) -> None:
    from genloop.serve.http_metrics import key_label

    headers = [(b"authorization", header)] if header is not None else []
    assert key_label({"type": "http", "headers": headers}) == label


def test_an_unhandled_error_is_counted_and_logged_as_a_500() -> None:
    """Starlette's error middleware sits outside every user middleware: the exception passes
    through ours first, which must count the 500 the client then gets."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from genloop.monitor.metrics import ServingMetrics
    from genloop.monitor.usage import RequestRecord
    from genloop.serve.errors import install_error_handlers
    from genloop.serve.http_metrics import HttpMetricsMiddleware

    class Log:
        def __init__(self) -> None:
            self.records: list[RequestRecord] = []

        def submit_rejected(self, record: RequestRecord) -> bool:
            self.records.append(record)
            return True

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom/{n}")
    async def boom(n: int) -> None:
        raise RuntimeError("a bug")

    metrics, log = ServingMetrics(), Log()
    app.add_middleware(
        HttpMetricsMiddleware, metrics=metrics, routes=lambda: ["/boom/{n}"], rejected_log=log
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/boom/1").status_code == 500
    text = metrics.render()[0].decode()
    assert (
        'genloop:http_requests_total{method="GET",reason="internal",route="/boom/{n}",'
        'status="500"} 1.0' in text
    )
    (record,) = log.records
    assert (record.endpoint, record.status, record.reason) == ("/boom/{n}", 500, "internal")
