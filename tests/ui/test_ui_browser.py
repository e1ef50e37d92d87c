"""The web UI in a real browser: Debian's chromium driven by Playwright against a live server.

One server (a tiny random Llama registered twice, a finished run with metric series, a
dataset version, an alert and drift scores) and one browser serve the whole module. Each
test opens a fresh page. Screenshots go to ``test-artifacts/ui/`` (gitignored) and are kept.

Without chromium (``/usr/bin/chromium``, installed by ``scripts/install-browser.sh``) or
Playwright the tests skip, except under CI (``$CI`` set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from genloop.workspace import Workspace, init_workspace

from ..serve.conftest import (
    CORPUS,
    LiveServer,
    build_model,
    running_server,
    serve_config,
    tiny_text_to_image,
)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
LONG_TOKENS = 3000  # the stop test's request: far longer than the test lets it run
PHONE = {"width": 390, "height": 844}
WIDE_SCREEN = {"width": 1280, "height": 900}
# the elements sticking out on the right (outside scrollable tables): a failure's culprits
WIDE = """() => [...document.querySelectorAll('body *')]
  .filter(e => e.getBoundingClientRect().right > innerWidth + 2 && !e.closest('.table-wrap'))
  .slice(0, 8).map(e => `${e.tagName}#${e.id}.${e.className}`)"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the browser tests must run)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- fixtures


def _add_run(ws: Workspace) -> str:
    """A finished training run with loss, val_loss and tokens_per_s series."""
    from genloop.workspace.tables import Run, RunMetric

    run_id = uuid.uuid4().hex
    with ws.catalog.session() as s:
        s.add(
            Run(
                id=run_id,
                name="ui-train",
                kind="train",
                status="completed",
                config={"train": {"lr": 0.003, "steps": 40}},
                summary={"loss": 2.1, "val_loss": 2.3},
            )
        )
        s.flush()
        for step in range(1, 41):
            s.add(RunMetric(run_id=run_id, key="loss", step=step, value=5.0 / step**0.3))
            s.add(RunMetric(run_id=run_id, key="tokens_per_s", step=step, value=900.0 + step))
            if step % 10 == 0:
                s.add(RunMetric(run_id=run_id, key="val_loss", step=step, value=5.2 / step**0.3))
    return run_id


def _add_run_pair(ws: Workspace) -> None:
    """Two training runs to compare: different lr, loss logged every 30 s for 20 steps."""
    from datetime import UTC, datetime, timedelta

    from genloop.workspace.tables import Run, RunMetric

    start = datetime.now(UTC) - timedelta(hours=2)
    with ws.catalog.session() as s:
        for name, lr, scale in [("ui-run-a", 0.001, 4.0), ("ui-run-b", 0.01, 3.0)]:
            run_id = uuid.uuid4().hex
            config = {"train": {"lr": lr, "steps": 20, "batch_size": 8}, "seed": 0}
            s.add(Run(id=run_id, name=name, kind="train", status="completed", config=config))
            s.flush()
            for step in range(1, 21):
                at = start + timedelta(seconds=30 * step)
                loss = scale / step**0.5 + (0.05 if step % 2 else -0.05)  # a noisy curve
                s.add(RunMetric(run_id=run_id, key="loss", step=step, value=loss, at=at))


def _add_pipeline_run(ws: Workspace) -> None:
    """A pipeline run whose summary holds its stages, as genloop.pipeline records them."""
    from genloop.workspace.tables import Run

    stages = {
        "data": {
            "status": "completed",
            "input_hash": "d" * 64,
            "outputs": {"dataset": "ui-corpus@1", "dataset_version_id": 1},
            "seconds": 1.234,
            "note": "",
        },
        "train": {
            "status": "cached",
            "input_hash": "t" * 64,
            "outputs": {"model": "tiny@2", "run_id": "ab" * 16, "dir": "/x/" + "y" * 80},
            "seconds": 0.01,
            "note": "same inputs as an earlier run",
        },
    }
    with ws.catalog.session() as s:
        s.add(
            Run(
                id=uuid.uuid4().hex,
                name="ui-pipeline",
                kind="pipeline",
                status="completed",
                config={"pipeline": {"name": "ui-pipeline", "stages": ["data", "train"]}},
                summary={"stages": stages},
            )
        )


def _add_traffic(ws: Workspace) -> None:
    """Logged requests over the last hour: mostly answered, some 404/500, some refused."""
    from datetime import UTC, datetime, timedelta

    from genloop.monitor.usage import RequestRecord, record_requests

    now = datetime.now(UTC)
    records = [
        RequestRecord(
            request_id=f"ui-traffic-{i}",
            endpoint="completions",
            model_name="tiny",
            latency_ms=20.0 + 3 * (i % 9),
            status=500 if i % 11 == 5 else 200,
            created_at=now - timedelta(minutes=58) + timedelta(minutes=2 * i),
        )
        for i in range(29)
    ]
    records += [
        RequestRecord(
            request_id=f"ui-refused-{i}",
            endpoint="/v1/completions",
            model_name="",
            status=401,
            rejected=True,
            method="POST",
            reason="unauthorized",
            created_at=now - timedelta(minutes=40 - i),
        )
        for i in range(3)
    ]
    record_requests(ws, None, records, store_text=False)


def _add_dataset(ws: Workspace) -> None:
    from genloop.workspace.datasets import register_dataset_version

    def write(d: Path) -> None:
        rows = [{"text": line} for line in CORPUS[:4]]
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "card.md").write_text("# ui-corpus\n\nRecords kept: 4 of 5 (1 exact duplicate).\n")

    register_dataset_version(
        ws, "ui-corpus", "hash-ui-1", write, stats={"records": 4, "tokens": 180, "dropped": 1}
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from genloop.data.tokenizer import train_bpe
    from genloop.monitor.alerts import raise_alert
    from genloop.monitor.drift import record_series
    from genloop.workspace import registry

    root = tmp_path_factory.mktemp("ui")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    # a long context, so that a stream can run for a while (the stop test)
    a = build_model(root / "a", tok, seed=0, context_length=LONG_TOKENS + 256)
    b = build_model(root / "b", tok, seed=1, context_length=LONG_TOKENS + 256)
    workspace = init_workspace(root / "ws")
    registry.register_model(workspace, "tiny", "causal_lm", a)
    registry.register_model(workspace, "tiny", "causal_lm", b)
    registry.promote(workspace, "tiny@1", "production")
    t2i = tiny_text_to_image(tmp_path_factory.mktemp("ui-t2i"))
    registry.register_model(workspace, "shapes", "text_to_image", t2i)
    _add_run(workspace)
    _add_run_pair(workspace)
    _add_pipeline_run(workspace)
    _add_traffic(workspace)
    _add_dataset(workspace)
    raise_alert(workspace, "drift", "prompt length drifted (psi 0.31)", source="tiny@1")
    record_series(workspace, "tiny", {"psi_prompt_length": 0.05})
    record_series(workspace, "tiny", {"psi_prompt_length": 0.31})
    yield workspace
    workspace.close()


@pytest.fixture(scope="module")
def server(ws: Workspace) -> Iterator[LiveServer]:
    from genloop.security.keys import create_key

    keys = {
        "admin": create_key(ws.catalog, name="ui-admin", scopes=["admin"]).plaintext,
        "generate": create_key(ws.catalog, name="ui-gen", scopes=["generate"]).plaintext,
    }
    cfg = serve_config(max_tokens=LONG_TOKENS, models=["tiny@production", "shapes"])
    with running_server(ws, cfg, keys) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        _unavailable(f"{CHROMIUM} is missing (run scripts/install-browser.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield b
        b.close()


@contextmanager
def checked_page(browser: Any, url: str, **options: Any) -> Iterator[Any]:
    """A page in a fresh browser context (``options`` as ``new_context`` takes them) that
    fails the test, once closed, if the page's JavaScript raised."""
    context = browser.new_context(base_url=url, **options)
    context.set_default_timeout(20_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    with checked_page(browser, server.url, viewport=WIDE_SCREEN) as pg:
        pg.on("dialog", lambda dialog: dialog.accept())  # promote / roll back confirmations
        yield pg


def chart_series(figure: Any) -> list[str]:
    """The names of the series the uPlot instance behind a chart figure draws."""
    return figure.evaluate("f => f.uplot.series.slice(1).map(s => s.label)")


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, key: str) -> None:
    page.goto("/")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#pg-model option", state="attached")


def wait_row(ws: Workspace, table: Any, column: Any, value: str, timeout: float = 10.0) -> Any:
    from sqlalchemy import select

    deadline = time.monotonic() + timeout
    while True:
        with ws.catalog.session() as s:
            rows = list(s.scalars(select(table).where(column == value)))
        if rows:
            return rows
        assert time.monotonic() < deadline, f"no {table.__name__} row for {value}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- tests


def test_ui_is_served_without_a_key_but_the_api_is_not(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        index = c.get("/")
        assert index.status_code == 200 and "<title>genloop</title>" in index.text
        assert c.get("/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/admin/monitoring").status_code == 401


def test_sign_in_with_the_keyboard_wrong_key_then_right_key(page: Any, server: LiveServer) -> None:
    page.goto("/")
    for _ in range(6):  # the key field is reached by Tab from the top of the page
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "api-key":
            break
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.type("gl_wrong_key_000000000000")
    page.keyboard.press("Enter")
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    assert "not accepted" in notice.inner_text()
    assert page.locator("#nav").is_hidden()
    shot(page, "signin-wrong-key")

    page.fill("#api-key", server.keys["admin"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#pg-model option", state="attached")
    options = page.locator("#pg-model option").all_inner_texts()
    assert any(o.startswith("tiny@production") for o in options)
    assert page.locator("#notice").is_hidden()
    assert page.locator("#nav a[data-view=runs]").is_visible()  # an admin key sees admin views
    # the key survives a reload (session storage), and is never put in the page's URL
    page.reload()
    page.wait_for_selector("#pg-model option", state="attached")
    assert server.keys["admin"] not in page.url
    shot(page, "signin-ok")


def test_a_generate_key_sees_only_the_playground(page: Any, server: LiveServer) -> None:
    sign_in(page, server.keys["generate"])
    assert page.locator("#nav a[data-view=playground]").is_visible()
    assert page.locator("#nav a[data-view=models]").is_hidden()


def test_chat_reply_streams_in_and_feedback_reaches_the_catalog(
    page: Any, server: LiveServer, ws: Workspace
) -> None:
    from genloop.workspace.tables import Feedback

    sign_in(page, server.keys["admin"])
    # record every length the answer goes through while it streams
    page.evaluate(
        """() => {
        window.lengths = [];
        new MutationObserver(() => {
          const t = document.querySelector('#pg-transcript .assistant .text');
          if (t) window.lengths.push(t.textContent.length);
        }).observe(document.getElementById('pg-transcript'),
                   {subtree: true, childList: true, characterData: true});
    }"""
    )
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", "300")
    page.fill("#pg-prompt", "Hello there!")
    page.click("#pg-send")
    page.wait_for_function("document.getElementById('pg-status').textContent === 'Done.'")
    lengths = page.evaluate("window.lengths")
    grown = sorted({n for n in lengths if n > 0})
    assert len(grown) >= 3, f"the answer did not stream in: lengths {lengths}"
    answer = page.locator("#pg-transcript .assistant .text").inner_text()
    assert len(answer) > 0

    controls = page.locator("#pg-transcript .assistant .feedback")
    response_id = controls.get_attribute("data-response-id")
    assert response_id and response_id.startswith("chatcmpl")
    page.get_by_role("button", name="Good answer").click()
    page.wait_for_selector("text=Feedback sent")
    (row,) = wait_row(ws, Feedback, Feedback.request_id, response_id)
    assert row.rating == 1 and row.correction_enc is None

    page.get_by_role("button", name="Edit the answer").click()
    page.get_by_label("Corrected answer").fill("Hello! I am well, thank you.")
    page.get_by_role("button", name="Send correction").click()
    page.wait_for_selector("text=Correction sent")
    rows = wait_row(ws, Feedback, Feedback.request_id, response_id)
    while len(rows) < 2:
        rows = wait_row(ws, Feedback, Feedback.request_id, response_id)
    assert sorted(r.rating for r in rows) == [-1, 1]
    assert any(r.correction_enc for r in rows)
    # and the admin API lists it, as the catalog's feedback table
    with server.client(server.keys["admin"]) as c:
        listed = c.get("/v1/admin/feedback").json()["data"]
    assert {f["response_id"] for f in listed} >= {response_id}
    shot(page, "chat-feedback")


def test_a_text_prompt_draws_images_and_takes_a_rating(
    page: Any, server: LiveServer, ws: Workspace
) -> None:
    from genloop.workspace.tables import Feedback, RequestLog

    sign_in(page, server.keys["admin"])  # generate and feedback
    page.select_option("#pg-model", "shapes")
    assert page.locator("#pg-negative").is_visible()  # the image fields replace sampling
    page.fill("#pg-n", "2")
    page.fill("#pg-image-seed", "3")
    page.fill("#pg-steps", "2")
    page.fill("#pg-guidance", "3")
    page.fill("#pg-negative", "a blue square")
    page.fill("#pg-prompt", "a red circle on the left")
    page.click("#pg-send")
    page.wait_for_function("document.getElementById('pg-status').textContent === '2 images.'")
    assert page.locator("#pg-images figure img").count() == 2
    controls = page.locator("#pg-images .feedback")
    response_id = controls.get_attribute("data-response-id")
    assert response_id and response_id.startswith("img")
    page.get_by_role("button", name="Good images").click()
    page.wait_for_selector("text=Feedback sent")
    (row,) = wait_row(ws, Feedback, Feedback.request_id, response_id)
    assert row.rating == 1
    (logged,) = wait_row(ws, RequestLog, RequestLog.id, response_id)
    assert logged.params["num_inference_steps"] == 2 and logged.params["guidance_scale"] == 3
    assert "negative_prompt" not in logged.params  # user text only where it is encrypted
    shot(page, "t2i-rating")


def test_stop_cancels_the_stream(page: Any, server: LiveServer, ws: Workspace) -> None:
    from genloop.workspace.tables import RequestLog

    sign_in(page, server.keys["admin"])
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", str(LONG_TOKENS))
    page.fill("#pg-prompt", "Tell me a very long story.")
    page.click("#pg-send")
    page.wait_for_function(
        "(document.querySelector('#pg-transcript .assistant .text')?.textContent || '').length > 0"
    )
    assert page.locator("#pg-stop").is_enabled()
    page.click("#pg-stop")
    page.wait_for_function("document.getElementById('pg-status').textContent === 'Stopped.'")
    assert page.locator("#pg-stop").is_disabled()
    assert page.locator("#pg-send").is_enabled()
    response_id = page.locator(".assistant .feedback").get_attribute("data-response-id")
    assert response_id
    (row,) = wait_row(ws, RequestLog, RequestLog.id, response_id)
    # the server saw the client go (499) and stopped generating well short of the limit
    assert row.status == 499, row.status
    assert row.completion_tokens < LONG_TOKENS
    shot(page, "chat-stopped")


def test_a_runs_loss_and_throughput_charts(page: Any, server: LiveServer) -> None:
    sign_in(page, server.keys["admin"])
    page.click("#nav a[data-view=runs]")
    page.get_by_role("button", name="ui-train").click()
    page.wait_for_selector("#run-title")
    loss = page.locator("figure.chart[data-drawn]", has_text="Loss")
    loss.wait_for()
    assert loss.locator("canvas").is_visible()
    assert chart_series(loss) == ["loss", "val_loss"]
    label = loss.locator(".plot").get_attribute("aria-label")
    assert "loss: 40 points" in label and "val_loss: 4 points" in label
    assert page.locator("figure.chart[data-drawn]", has_text="Throughput").is_visible()
    page.get_by_text("Config", exact=True).click()
    assert page.locator("#run-config").get_by_text('"lr": 0.003').count() == 1
    shot(page, "run-chart")


def test_data_view_shows_stats_report_and_samples(page: Any, server: LiveServer) -> None:
    sign_in(page, server.keys["admin"])
    page.click("#nav a[data-view=data]")
    page.get_by_role("button", name="ui-corpus@1").click()
    detail = page.locator("#dataset-detail")
    detail.get_by_text("1 exact duplicate").wait_for()
    assert detail.locator("ol.samples li").count() == 4
    assert detail.get_by_role("cell", name="dropped").count() == 1
    shot(page, "data")


def test_monitoring_series_and_view(page: Any, server: LiveServer) -> None:
    with server.client(server.keys["admin"]) as c:
        c.post(
            "/v1/completions", json={"model": "tiny@production", "prompt": "Hi", "max_tokens": 2}
        ).raise_for_status()
        deadline = time.monotonic() + 10
        while True:  # request rows are written a moment after the response
            mon = c.get("/v1/admin/monitoring", params={"hours": 1, "bucket_minutes": 5}).json()
            if sum(p["requests"] for p in mon["requests"]) >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert mon["bucket_minutes"] == 5
    point = mon["requests"][-1]
    assert point["requests"] >= 1 and point["latency_p50_ms"] > 0
    assert point["latency_p50_ms"] <= point["latency_p95_ms"] <= point["latency_p99_ms"]
    assert [v for _, v in mon["drift"]["tiny"]["psi_prompt_length"]] == [0.05, 0.31]
    with server.client(server.keys["generate"]) as c:
        assert c.get("/v1/admin/monitoring").status_code == 403

    sign_in(page, server.keys["admin"])
    page.click("#nav a[data-view=monitoring]")
    page.wait_for_selector("#mon-summary")
    assert page.locator("figure.chart[data-drawn]", has_text="Latency percentiles").is_visible()
    assert page.locator("figure.chart[data-drawn]", has_text="Drift: tiny").is_visible()
    alerts = page.locator("#alerts-table")
    assert alerts.get_by_text("prompt length drifted").is_visible()
    alerts.get_by_role("button", name="Resolve").click()
    alerts.get_by_role("button", name="Resolve").wait_for(state="detached")
    shot(page, "monitoring")


def test_phone_width_has_no_horizontal_scroll(browser: Any, server: LiveServer) -> None:
    context = browser.new_context(base_url=server.url, viewport=PHONE)
    page = context.new_page()
    try:
        sign_in(page, server.keys["admin"])
        for view, ready in [
            ("playground", "#pg-form"),
            ("runs", "#runs-table"),
            ("models", "#models-table"),
            ("data", "#datasets-table"),
            ("monitoring", "#mon-summary"),
        ]:
            page.click(f"#nav a[data-view={view}]")
            page.wait_for_selector(ready)
            if view == "runs":
                page.get_by_role("button", name="ui-train").click()
                page.wait_for_selector("#run-title")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"{view}: {width}px wide, {page.evaluate(WIDE)}"
            shot(page, f"phone-{view}")
    finally:
        context.close()


def test_promote_and_roll_back_a_model_version(
    page: Any, server: LiveServer, ws: Workspace
) -> None:
    from genloop.workspace import registry

    sign_in(page, server.keys["admin"])
    page.click("#nav a[data-view=models]")
    page.wait_for_selector("#models-table")
    assert page.locator(".aliases[data-ref='tiny@1']").inner_text() == "production"

    page.get_by_role("button", name="Promote tiny@2").click()
    page.locator("#notice").get_by_text("now points at version 2").wait_for()
    assert registry.resolve(ws, "tiny@production").version == 2
    page.wait_for_function(
        "document.querySelector(\".aliases[data-ref='tiny@2']\").textContent === 'production'"
    )
    history = page.locator("#models-history")
    history.get_by_role("cell", name="promoted in the web UI").wait_for()

    page.select_option("#cmp-a", "tiny@1")
    page.select_option("#cmp-b", "tiny@2")
    page.get_by_role("button", name="Compare").click()
    page.wait_for_selector("#diff-out table")
    shot(page, "models-promoted")

    page.select_option("#rb-name", "tiny")  # the workspace serves "shapes" too
    page.get_by_role("button", name="Roll back").click()
    page.locator("#notice").get_by_text("back at version 1").wait_for()
    assert registry.resolve(ws, "tiny@production").version == 1


# --------------------------------------------------------------------------- charts (uPlot)

# uPlot draws axes on a canvas: record every text it draws with its box in canvas pixels
# (measureText's bounding box around the alignment point), per canvas, since its last clear.
CANVAS_PROBE = """(() => {
  const P = CanvasRenderingContext2D.prototype, fill = P.fillText, clear = P.clearRect;
  P.clearRect = function (x, y, w, h) {
    const c = this.canvas;
    if (x === 0 && y === 0 && w >= c.width && h >= c.height) c.texts = [];
    return clear.call(this, x, y, w, h);
  };
  P.fillText = function (text, x, y, ...rest) {
    const t = this.getTransform(), m = this.measureText(text);
    if (t.b === 0 && t.c === 0) {  // rotated text (the y axis' title) is left out
      const X = t.a * x + t.e, Y = t.d * y + t.f;
      (this.canvas.texts ||= []).push({
        text: String(text), align: this.textAlign, baseline: this.textBaseline, x: X,
        left: X - m.actualBoundingBoxLeft, right: X + m.actualBoundingBoxRight,
        top: Y - m.actualBoundingBoxAscent, bottom: Y + m.actualBoundingBoxDescent,
      });
    }
    return fill.call(this, text, x, y, ...rest);
  };
})()"""
DRAWN_TEXTS = """f => { const c = f.querySelector('canvas');
  return {width: c.width, height: c.height, texts: c.texts || [],
          xLabel: f.uplot.axes[0].label}; }"""


def axis_texts(figure: Any) -> tuple[list[str], list[str]]:
    """A drawn chart's x tick labels (lines of one tick joined) and y tick labels, after
    checking that every text lies wholly inside the canvas (none clipped)."""
    drawn = figure.evaluate(DRAWN_TEXTS)
    assert drawn["texts"], "nothing was drawn on the chart's canvas"
    for t in drawn["texts"]:
        inside = (
            t["left"] >= 0
            and t["top"] >= 0
            and t["right"] <= drawn["width"]
            and t["bottom"] <= drawn["height"]
        )
        assert inside, f"{t['text']!r} is cut off: {t} outside {drawn['width']}x{drawn['height']}"
    ticks: dict[float, list[str]] = {}
    for t in drawn["texts"]:
        if t["align"] == "center" and t["baseline"] == "top" and t["text"] != drawn["xLabel"]:
            ticks.setdefault(round(t["x"]), []).append(t["text"])
    xs = [" ".join(parts) for _, parts in sorted(ticks.items())]
    ys = [t["text"] for t in drawn["texts"] if t["align"] == "right"]
    return xs, ys


def _window(summary: str) -> tuple[Any, Any]:
    from datetime import datetime

    found = re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d) UTC", summary)
    assert len(found) == 2, summary
    since, until = (datetime.strptime(f, "%Y-%m-%d %H:%M") for f in found)
    return since, until


def test_time_axes_are_utc_distinct_and_never_clipped(browser: Any, server: LiveServer) -> None:
    from datetime import timedelta

    # a browser far from UTC: an axis in the browser's zone would disagree with the header
    context = browser.new_context(
        base_url=server.url, viewport=WIDE_SCREEN, timezone_id="America/New_York"
    )
    context.add_init_script(CANVAS_PROBE)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        sign_in(page, server.keys["admin"])
        page.click("#nav a[data-view=monitoring]")
        page.wait_for_selector("#mon-summary")
        page.select_option("#mon-window", "1:5")
        page.get_by_text("in buckets of 5 min").wait_for()
        since, until = _window(page.locator("#mon-summary").inner_text())
        assert until - since == timedelta(hours=1)
        for width in (WIDE_SCREEN["width"], PHONE["width"]):
            page.set_viewport_size({"width": width, "height": 900})
            for title in ("Request rate", "Latency percentiles", "Errors by class", "Drift: tiny"):
                figure = page.locator("figure.chart[data-drawn]", has_text=title)
                page.wait_for_function(
                    "([f, w]) => f.uplot.width === Math.floor(f.querySelector('.plot').clientWidth)"
                    " && f.querySelector('canvas').texts?.length",
                    arg=[figure.element_handle(), width],
                )
                xs, ys = axis_texts(figure)
                assert figure.evaluate("f => f.uplot.axes[0].label") == "time (UTC)"
                assert len(xs) >= 2 and len(set(xs)) == len(xs), f"{title}: x labels {xs}"
                assert len(set(ys)) == len(ys) >= 2, f"{title}: y labels {ys}"
                # the axis names the same hours as the header (both UTC)
                for label in xs:
                    hm = re.match(r"^(\d\d):(\d\d)", label)
                    if hm is None:
                        continue
                    at = since.replace(hour=int(hm[1]), minute=int(hm[2]))
                    if at < since - timedelta(minutes=30):
                        at += timedelta(days=1)
                    assert since - timedelta(minutes=30) <= at <= until + timedelta(minutes=30), (
                        f"{title}: tick {label} is outside the window {since}–{until} UTC"
                    )
            shot(page, f"monitoring-hour-{width}")
        # thirty days: one hour of traffic still gives readable, distinct labels
        page.set_viewport_size(WIDE_SCREEN)
        page.select_option("#mon-window", "720:720")
        page.get_by_text("in buckets of 720 min").wait_for()
        figure = page.locator("figure.chart[data-drawn]", has_text="Request rate")
        drawn = "f => f.querySelector('canvas').texts?.length"
        page.wait_for_function(drawn, arg=figure.element_handle())
        xs, _ = axis_texts(figure)
        assert len(xs) >= 2 and len(set(xs)) == len(xs), xs
        # a chart with nothing to draw says so in words, not an empty frame
        empty = page.evaluate(
            "async () => (await import('./charts.js')).chart('Request rate', [],"
            " {empty: 'No requests in this window.'}).outerHTML"
        )
        assert "No requests in this window." in empty and "canvas" not in empty
    finally:
        context.close()
    assert not errors, f"JavaScript errors: {errors}"


def test_runs_overlay_smoothing_diff_and_pipeline_stages(page: Any, server: LiveServer) -> None:
    sign_in(page, server.keys["admin"])
    page.click("#nav a[data-view=runs]")
    page.get_by_label("Compare ui-run-a").check()
    assert "one more" in page.locator("#runs-compare").inner_text()
    page.get_by_label("Compare ui-run-b").check()
    figure = page.locator("#cmp-chart figure.chart[data-drawn]")
    figure.wait_for()
    assert chart_series(figure) == ["ui-run-a", "ui-run-b"]
    assert "ui-run-a" in figure.locator(".u-legend").inner_text()

    def wiggle() -> float:  # how much run a's curve bends back and forth: |second difference|
        ys = figure.evaluate("f => f.uplot.data[1]")
        return sum(abs(c - 2 * b + a) for a, b, c in zip(ys, ys[1:], ys[2:], strict=False))

    raw = wiggle()
    page.locator("#cmp-smooth").evaluate(
        "e => { e.value = '0.9'; e.dispatchEvent(new Event('input')); }"
    )
    assert page.locator("#cmp-smooth-value").inner_text() == "0.9"
    figure = page.locator("#cmp-chart figure.chart[data-drawn]")
    figure.wait_for()
    assert wiggle() < raw / 2
    page.select_option("#cmp-x", "time")
    figure = page.locator("#cmp-chart figure.chart[data-drawn]")
    figure.wait_for()
    xs = figure.evaluate("f => f.uplot.data[0]")
    assert xs[0] == 0 and xs[-1] == pytest.approx(9.5)  # 19 steps, 30 s apart, in minutes
    diff = page.locator("#runs-diff")
    lr = diff.locator("tr", has=page.get_by_text("train.lr", exact=True))
    assert lr.locator("td").all_inner_texts()[2:] == ["0.001000", "0.01000"]
    assert diff.get_by_text("train.steps").count() == 0  # the same in both: not a difference
    assert diff.locator("tr", has=page.get_by_text("loss", exact=True)).count() == 1
    shot(page, "runs-compare")
    page.set_viewport_size(PHONE)
    page.wait_for_function("f => f.uplot.width < 390", arg=figure.element_handle())
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], page.evaluate(
        WIDE
    )
    shot(page, "phone-runs-compare")

    page.set_viewport_size(WIDE_SCREEN)
    page.get_by_role("button", name="ui-pipeline").click()
    stages = page.locator("#run-stages")
    stages.wait_for()
    assert stages.locator("tbody tr").count() == 2
    train = stages.locator("tr", has=page.get_by_role("cell", name="train", exact=True))
    assert train.get_by_text("cached").is_visible()
    assert train.get_by_role("link", name="tiny@2").get_attribute("href") == "#models"
    assert "…" in train.inner_text() and "{" not in stages.inner_text()  # short, not JSON
    assert stages.get_by_role("link", name="ui-corpus@1").get_attribute("href") == "#data"
    assert "null" not in page.locator("#run-detail").inner_text()
    page.get_by_text("Config", exact=True).click()
    config = page.locator("#run-config")
    assert config.is_visible() and '"stages"' in config.inner_text()
    box, main = config.bounding_box(), page.locator("main").bounding_box()
    assert box["x"] + box["width"] <= main["x"] + main["width"]
    shot(page, "run-pipeline")


def test_a_view_that_fails_to_load_offers_retry(page: Any, server: LiveServer) -> None:
    sign_in(page, server.keys["admin"])
    page.route("**/v1/admin/runs?*", lambda route: route.abort())
    page.click("#nav a[data-view=runs]")
    alert = page.locator("#view-runs [role=alert]")
    alert.wait_for()
    assert "connection" in alert.inner_text()
    shot(page, "runs-failed")
    page.unroute("**/v1/admin/runs?*")
    page.locator("#view-runs").get_by_role("button", name="Retry").click()
    page.wait_for_selector("#runs-table")
    assert page.locator("#view-runs [role=alert]").count() == 0


def test_a_view_whose_code_fails_to_load_offers_retry(page: Any, server: LiveServer) -> None:
    sign_in(page, server.keys["admin"])
    page.route("**/monitoring.js*", lambda route: route.abort())
    page.click("#nav a[data-view=monitoring]")
    alert = page.locator("#view-monitoring [role=alert]")
    alert.wait_for()
    assert "could not be loaded" in alert.inner_text()
    assert page.locator("#view-monitoring h2").inner_text() == "Monitoring"
    page.unroute("**/monitoring.js*")
    page.locator("#view-monitoring").get_by_role("button", name="Retry").click()
    page.wait_for_selector("#mon-summary")
