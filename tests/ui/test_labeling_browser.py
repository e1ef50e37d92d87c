"""The Label view in a real browser (Debian's chromium driven by Playwright, as in
``test_ui_browser.py``): a label-only key labels classification items (accepting and
correcting pre-labels) and meets a refused second submission; an admin marks token spans,
picks between two generations and reads the agreement table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from genloop.workspace import Workspace, init_workspace

from ..serve.conftest import CORPUS, LiveServer, build_model, running_server, serve_config

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"

REVIEWS = [
    {"text": "a lovely quiet film", "label": "pos"},
    {"text": "dull and far too long", "label": "pos"},
    {"text": "the cast is wonderful"},
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from genloop.data.tokenizer import train_bpe
    from genloop.feedback.labeling.queue import next_item, submit_label
    from genloop.feedback.labeling.tasks import create_task
    from genloop.workspace import registry

    root = tmp_path_factory.mktemp("label-ui")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    workspace = init_workspace(root / "ws")
    registry.register_model(workspace, "tiny", "causal_lm", build_model(root / "m", tok, seed=0))
    registry.promote(workspace, "tiny@1", "production")
    files = {
        "reviews": _jsonl(root / "reviews.jsonl", REVIEWS),
        "ner": _jsonl(root / "ner.jsonl", [{"text": "Ada moved to Paris"}]),
        "pick": _jsonl(
            root / "pick.jsonl", [{"prompt": "Say hi", "a": "hi there", "b": "go away"}]
        ),
        "agree": _jsonl(root / "agree.jsonl", [{"text": t["text"]} for t in REVIEWS]),
    }
    create_task(
        workspace, "reviews", "classification", file=files["reviews"], labels=["pos", "neg"]
    )
    create_task(workspace, "ner", "spans", file=files["ner"], labels=["PER", "LOC"])
    create_task(workspace, "pick", "preference", file=files["pick"])
    create_task(workspace, "agree", "classification", file=files["agree"], labels=["pos", "neg"])
    for who, labels in (("carol", ["pos", "neg", "pos"]), ("dave", ["pos", "neg", "neg"])):
        for label in labels:
            item = next_item(workspace, "agree", who, agreement=who == "dave")
            assert item is not None
            submit_label(workspace, "agree", item.id, who, {"label": label})
    yield workspace
    workspace.close()


@pytest.fixture(scope="module")
def server(ws: Workspace) -> Iterator[LiveServer]:
    from genloop.security.keys import create_key

    keys = {
        "alice": create_key(ws.catalog, name="alice", scopes=["label"], user_id="alice").plaintext,
        "admin": create_key(ws.catalog, name="ui-admin", scopes=["admin"]).plaintext,
    }
    with running_server(ws, serve_config(), keys) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium (skipped without it, except under CI), as test_ui_browser.py."""
    import os

    reason = None
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing (run scripts/install-browser.sh)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so the browser tests must run)", pytrace=False)
        pytest.skip(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield b
        b.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1200, "height": 900})
    context.set_default_timeout(20_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def open_task(page: Any, key: str, task: str) -> None:
    page.goto("/#label")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#label-task option", state="attached")
    page.select_option("#label-task", task)
    ready(page, task)


def ready(page: Any, task: str) -> None:
    """Wait until the view shows ``task``'s next item (or says none is left)."""
    page.wait_for_selector(f"#label-form[data-task={task}], #label-done[data-task={task}]")


def labels(ws: Workspace, task: str) -> list[tuple[str, dict[str, Any], bool | None]]:
    from genloop.feedback.labeling.queue import labels_of

    return [(lb.annotator, lb.value, lb.prelabel_accepted) for lb in labels_of(ws, task)]


def test_a_label_key_accepts_and_corrects_pre_labels(
    page: Any, server: LiveServer, ws: Workspace
) -> None:
    open_task(page, server.keys["alice"], "reviews")
    # a label-only key sees the Label view alone
    assert page.locator("#nav a[data-view=label]").is_visible()
    assert page.locator("#nav a[data-view=playground]").is_hidden()
    assert page.locator("#label-text").inner_text() == REVIEWS[0]["text"]
    assert page.locator("button.choice[aria-pressed=true]").inner_text() == "pos"  # the pre-label
    shot(page, "label-classification")
    page.click("#label-submit")
    page.locator("#notice").get_by_text("pre-label accepted").wait_for()

    page.locator("#label-text", has_text=REVIEWS[1]["text"]).wait_for()
    page.click("button.choice[data-label=neg]")
    page.click("#label-submit")
    page.locator("#notice").get_by_text("pre-label corrected").wait_for()
    page.locator("#label-text", has_text=REVIEWS[2]["text"]).wait_for()
    assert page.locator("#label-you").inner_text() == "2 labeled, 1 left"
    assert page.locator("#label-accuracy").inner_text() == "1 of 2 accepted (50%)"

    # the same person labels the last item elsewhere first: the page's submission is refused
    item_id = page.get_attribute("#label-form", "data-item")
    with server.client(server.keys["alice"]) as c:
        url = f"/v1/label/tasks/reviews/items/{item_id}/labels"
        assert c.post(url, json={"value": {"label": "pos"}}).status_code == 201
    page.click("button.choice[data-label=neg]")
    page.click("#label-submit")
    page.locator("#notice").get_by_text("already labeled by alice").wait_for()
    assert labels(ws, "reviews") == [
        ("alice", {"label": "pos"}, True),
        ("alice", {"label": "neg"}, False),
        ("alice", {"label": "pos"}, None),
    ]


def test_spans_preference_and_agreement(page: Any, server: LiveServer, ws: Workspace) -> None:
    open_task(page, server.keys["admin"], "ner")
    tokens = page.locator("#label-tokens button.token")
    assert tokens.all_inner_texts() == ["Ada", "moved", "to", "Paris"]
    page.click("button.choice[data-label=PER]")
    tokens.nth(0).click()
    page.click("button.choice[data-label=LOC]")
    tokens.nth(3).click()
    tokens.nth(2).click()
    tokens.nth(2).click()  # a second click clears it
    shot(page, "label-spans")
    page.click("#label-submit")
    page.wait_for_selector("#label-done[data-task=ner]")
    assert labels(ws, "ner") == [("ui-admin", {"labels": ["PER", "O", "O", "LOC"]}, None)]

    page.select_option("#label-task", "pick")
    ready(page, "pick")
    page.get_by_role("button", name="B is better").click()
    page.click("#label-submit")
    page.wait_for_selector("#label-done[data-task=pick]")
    assert labels(ws, "pick") == [("ui-admin", {"choice": "b"}, None)]

    page.select_option("#label-task", "agree")
    ready(page, "agree")
    row = page.locator("#label-agreement-table tbody tr")
    row.get_by_text("carol / dave").wait_for()
    # carol and dave agree on 2 of 3 items: p_o = 2/3, p_e = 2/3·1/3 + 1/3·2/3 = 4/9,
    # kappa = (2/3 − 4/9) / (5/9) = 0.4
    assert row.locator("td").all_inner_texts() == ["carol / dave", "3", "67%", "0.4000"]
    shot(page, "label-agreement")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing scrolls sideways
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/v1/label/tasks").status_code == 401
