"""The Models and Data views in a real browser (as ``test_ui_browser.py``): what a model
version is (format, size, measured numbers, parent → variant lineage), a dataset's records
paged and escaped, image thumbnails with captions, token-only datasets, and a failed load
that offers Retry. The workspace is ``test_accessibility.py``'s (a model and its int8
variant, a text, an image and a token-only dataset)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ..serve.conftest import LiveServer
from .test_accessibility import server, ws
from .test_ui_browser import PHONE, WIDE, browser, checked_page, shot, sign_in

__all__ = ["browser", "server", "ws"]  # the module-scoped fixtures this module reuses


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    with checked_page(browser, server.url, viewport={"width": 1280, "height": 900}) as pg:
        yield pg


def _cells(page: Any, ref: str) -> dict[str, str]:
    """The Model versions table's row of ``ref``, by column header."""
    headers = page.locator("#models-table thead th").all_inner_texts()
    cells: list[str] = page.evaluate(
        """(ref) => [...document.querySelectorAll('#models-table tbody tr')]
            .find(tr => tr.cells[0].innerText === ref).cells"""
        """ && [...[...document.querySelectorAll('#models-table tbody tr')]
            .find(tr => tr.cells[0].innerText === ref).cells].map(td => td.innerText)""",
        ref,
    )
    return dict(zip(headers, cells, strict=True))


def _open_models(page: Any, server: LiveServer) -> None:
    sign_in(page, server.keys["admin"])
    page.click("#nav a[data-view=models]")
    page.wait_for_selector("#lineage-tree")


def test_versions_show_format_size_measurements_and_lineage(page: Any, server: LiveServer) -> None:
    _open_models(page, server)
    parent, variant = _cells(page, "tiny@1"), _cells(page, "tiny@2")
    assert parent["Format"] == "fp32" and variant["Format"] == "int8"
    assert variant["Parent"] == "tiny@1" and parent["Stage"] == "production"
    assert variant["Size"].endswith("kB") and variant["Perplexity"] == "310.00"
    # never measured: a dash, with a tooltip (and screen-reader text) saying so
    latency = page.locator("#models-table tbody tr").first.locator(".unmeasured").first
    assert "Not measured" in latency.get_attribute("title")
    assert parent["Latency p50"].startswith("—")
    # the variant hangs under its parent, the transform named on the way
    child = page.locator("#lineage-tree li[data-ref='tiny@1'] > ul > li[data-ref='tiny@2']")
    text = " ".join(child.text_content().split())
    assert text.startswith("↳ int8-dynamic: tiny@2 int8") and "ppl 310.00" in text
    shot(page, "models-lineage")


def test_models_lineage_reads_at_phone_width(browser: Any, server: LiveServer) -> None:
    context = browser.new_context(base_url=server.url, viewport=PHONE)
    page = context.new_page()
    try:
        _open_models(page, server)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{width}px wide: {page.evaluate(WIDE)}"
        assert page.locator("#lineage-tree li[data-ref='tiny@2']").is_visible()
        shot(page, "phone-models-lineage")
    finally:
        context.close()


def test_a_failed_load_shows_the_error_and_retry(page: Any, server: LiveServer) -> None:
    sign_in(page, server.keys["admin"])
    page.route(
        "**/v1/admin/models/variants",
        lambda route: route.fulfill(
            status=500,
            content_type="application/json",
            body='{"error": {"message": "catalog unavailable", "type": "server_error"}}',
        ),
    )
    page.click("#nav a[data-view=models]")
    error = page.locator("#models-list .failed [role=alert]")
    error.wait_for()
    assert "catalog unavailable" in error.inner_text()
    page.unroute("**/v1/admin/models/variants")
    page.locator("#models-list").get_by_role("button", name="Retry").click()
    page.wait_for_selector("#models-table")

    page.route("**/v1/admin/datasets", lambda route: route.abort())
    page.click("#nav a[data-view=data]")
    page.locator("#datasets-list .failed").get_by_text("Lost the connection").wait_for()
    page.unroute("**/v1/admin/datasets")
    page.locator("#datasets-list").get_by_role("button", name="Retry").click()
    page.wait_for_selector("#datasets-table")


def _open_dataset(page: Any, server: LiveServer, ref: str) -> None:
    sign_in(page, server.keys["admin"])
    page.click("#nav a[data-view=data]")
    page.get_by_role("button", name=ref).click()
    page.wait_for_selector("#records-title")


def test_text_records_page_escaped_and_fold(page: Any, server: LiveServer) -> None:
    _open_dataset(page, server, "a11y-docs@1")
    items = page.locator("#records-list > li")
    items.first.wait_for()
    assert items.count() == 20
    assert page.locator("#records-position").inner_text() == "Records 1–20"
    assert page.get_by_role("button", name="Previous").is_disabled()
    first = items.first.locator("pre")
    # stored markup is shown as text, never rendered
    assert first.inner_text().startswith("<i>doc 0</i>")
    assert page.locator("#records-list i").count() == 0
    folded = len(first.inner_text())
    more = items.first.locator("button.expand")
    assert more.inner_text() == "Show all"
    more.click()
    assert more.get_attribute("aria-expanded") == "true" and more.inner_text() == "Show less"
    assert len(first.inner_text()) > folded
    page.get_by_role("button", name="Next").click()
    page.locator("#records-position", has_text="Records 21–25").wait_for()
    assert items.count() == 5 and items.first.get_attribute("data-index") == "20"
    assert page.get_by_role("button", name="Next").is_disabled()
    page.get_by_role("button", name="Previous").click()
    page.locator("#records-position", has_text="Records 1–20").wait_for()


def test_images_show_as_thumbnails_with_captions(page: Any, server: LiveServer) -> None:
    _open_dataset(page, server, "a11y-pics@1")
    page.wait_for_function(
        "[...document.querySelectorAll('ul.thumbs img')].filter(i => i.naturalWidth === 16)"
        ".length === 3"
    )
    assert page.locator("ul.thumbs figcaption").all_inner_texts() == [
        "a red square",
        "a green square",
        "a blue square",
    ]
    assert page.locator("ul.thumbs img").first.get_attribute("alt") == "a red square"
    shot(page, "data-images")


def test_a_token_only_dataset_says_what_it_stores(page: Any, server: LiveServer) -> None:
    _open_dataset(page, server, "a11y-toks@1")
    note = page.locator("#records p.help")
    note.wait_for()
    assert "token ids only" in note.inner_text() and "10 tokens" in note.inner_text()
