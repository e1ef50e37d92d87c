"""Every view of the web UI checked with axe-core in a real browser (Debian's chromium via
Playwright): no violation of impact "serious" or "critical", in the light and the dark
colour scheme, at desktop and phone width.

axe-core is vendored for the tests only (``tests/ui/vendor/``, see its README). The
workspace holds what makes each view draw its full content: a model and its int8 variant
with an evaluation (the Models lineage), a text and an image dataset (the Data record
browser), a run, an alert, and a labeling task. The browser and the helpers are
``test_ui_browser.py``'s.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from genloop.workspace import Workspace, init_workspace

from ..serve.conftest import CORPUS, LiveServer, build_model, running_server, serve_config
from .test_ui_browser import PHONE, _add_dataset, _add_run, browser, shot, sign_in

__all__ = ["browser"]  # the module-scoped chromium fixture, shared with test_ui_browser.py

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
BLOCKING = ("serious", "critical")


def _png(rgb: tuple[int, int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from genloop.config import OptimizeConfig
    from genloop.data.images import write_image_dataset
    from genloop.data.records import Record
    from genloop.data.tokenizer import train_bpe
    from genloop.evaluate.results import SuiteResult
    from genloop.evaluate.store import save_evaluation
    from genloop.feedback.labeling.tasks import create_task
    from genloop.monitor.alerts import raise_alert
    from genloop.optimize.run import optimize_model
    from genloop.workspace import registry
    from genloop.workspace.datasets import register_dataset_version

    root = tmp_path_factory.mktemp("a11y")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    workspace = init_workspace(root / "ws")
    registry.register_model(workspace, "tiny", "causal_lm", build_model(root / "m", tok, seed=0))
    registry.promote(workspace, "tiny@1", "production")
    optimize_model(workspace, "tiny@1", OptimizeConfig(quantize="int8"))  # tiny@2
    variant = registry.resolve(workspace, "tiny@2")
    save_evaluation(workspace, variant.id, None, [SuiteResult("perplexity", {"perplexity": 310.0})])
    _add_run(workspace)
    _add_dataset(workspace)

    def docs(d: Path) -> None:
        (d / "docs").mkdir()
        rows = [{"id": f"d{i}", "text": f"<i>doc {i}</i>\n" + "word " * 200} for i in range(25)]
        (d / "docs" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    register_dataset_version(workspace, "a11y-docs", "h-a11y-docs", docs)

    def images(d: Path) -> None:
        colors = {"red": (200, 0, 0), "green": (0, 150, 0), "blue": (0, 0, 200)}
        recs = [
            Record(f"i{i}", "images", text=f"a {c} square", data=_png(rgb), label=c)
            for i, (c, rgb) in enumerate(colors.items())
        ]
        write_image_dataset(recs, d / "images" / "train")

    register_dataset_version(workspace, "a11y-pics", "h-a11y-pics", images, kind="images")

    def tokens(d: Path) -> None:  # what a version keeps when only token shards are stored
        (d / "tokens").mkdir()
        (d / "tokens" / "train.json").write_text('{"tokens": 10}')
        (d / "tokens" / "train_00000.bin").write_bytes(bytes(20))

    register_dataset_version(workspace, "a11y-toks", "h-a11y-toks", tokens, stats={"tokens": 10})
    reviews = root / "reviews.jsonl"
    reviews.write_text(json.dumps({"text": "a lovely quiet film", "label": "pos"}) + "\n")
    create_task(workspace, "reviews", "classification", file=reviews, labels=["pos", "neg"])
    raise_alert(workspace, "drift", "prompt length drifted (psi 0.31)", source="tiny@1")
    yield workspace
    workspace.close()


@pytest.fixture(scope="module")
def server(ws: Workspace) -> Iterator[LiveServer]:
    from genloop.security.keys import create_key

    keys = {"admin": create_key(ws.catalog, name="a11y-admin", scopes=["admin"]).plaintext}
    with running_server(ws, serve_config(), keys) as live:
        yield live


def _view(name: str, ready: str) -> Callable[[Any], None]:
    def open_(page: Any) -> None:
        page.click(f"#nav a[data-view={name}]")
        page.wait_for_selector(ready)

    return open_


def _run_detail(page: Any) -> None:
    _view("runs", "#runs-table")(page)
    page.get_by_role("button", name="ui-train").click()
    page.wait_for_selector("#run-title")


def _records(dataset: str, ready: str) -> Callable[[Any], None]:
    def open_(page: Any) -> None:
        _view("data", "#datasets-table")(page)
        page.get_by_role("button", name=dataset).click()
        page.wait_for_selector(ready)

    return open_


def _images_loaded(page: Any) -> None:
    _records("a11y-pics@1", "ul.thumbs img")(page)
    page.wait_for_function(
        "[...document.querySelectorAll('ul.thumbs img')].every(i => i.complete && i.naturalWidth)"
    )


# every route of app.js (#playground, #runs, #models, #data, #monitoring, #label), and the
# detail panes a click opens
VIEWS: list[tuple[str, Callable[[Any], None]]] = [
    ("playground", _view("playground", "#pg-form")),
    ("runs", _view("runs", "#runs-table")),
    ("run-detail", _run_detail),
    ("models", _view("models", "#lineage-tree")),
    ("data", _view("data", "#datasets-table")),
    ("data-records", _records("a11y-docs@1", "ol.records li")),
    ("data-images", _images_loaded),
    ("monitoring", _view("monitoring", "#mon-summary")),
    ("label", _view("label", "#label-form")),
]


def _violations(page: Any) -> list[dict[str, Any]]:
    """axe's serious and critical violations on the page as it is now."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE))
    found: list[dict[str, Any]] = page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
            .map(v => ({id: v.id, impact: v.impact, help: v.help,
                        nodes: v.nodes.map(n => n.target.join(' '))}))"""
    )
    return [v for v in found if v["impact"] in BLOCKING]


def _report(failures: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for view, violations in failures.items():
        for v in violations:
            lines.append(f"{view}: [{v['impact']}] {v['id']}: {v['help']}")
            lines += [f"    {target}" for target in v["nodes"][:10]]
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("scheme", "viewport"),
    [
        ("light", {"width": 1280, "height": 900}),
        ("dark", {"width": 1280, "height": 900}),
        ("light", PHONE),
    ],
    ids=["light-1280", "dark-1280", "light-390"],
)
def test_every_view_has_no_serious_accessibility_violation(
    browser: Any, server: LiveServer, scheme: str, viewport: dict[str, int]
) -> None:
    context = browser.new_context(base_url=server.url, viewport=viewport, color_scheme=scheme)
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    failures: dict[str, list[dict[str, Any]]] = {}
    tag = f"{scheme}-{viewport['width']}"
    try:
        page.goto("/")
        page.wait_for_selector("#api-key")
        failures["signin"] = _violations(page)
        sign_in(page, server.keys["admin"])
        for name, open_ in VIEWS:
            open_(page)
            failures[name] = _violations(page)
            if name in ("models", "data-records", "data-images"):
                shot(page, f"a11y-{name}-{tag}")
    finally:
        context.close()
    assert not errors, f"JavaScript errors: {errors}"
    failures = {view: found for view, found in failures.items() if found}
    assert not failures, "axe found serious/critical violations:\n" + _report(failures)
