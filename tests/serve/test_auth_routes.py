"""Every route needs a key (except /health, and /metrics when configured public), and the
right scope; identifiers in paths cannot reach files outside their artifact.

The routes are walked from the app itself, so a route added later is checked too.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from genloop.serve.app import check_routes_guarded, create_app, route_scopes
from genloop.workspace import Workspace

from .conftest import LiveServer, auth, make_keys, running_server, serve_config

PUBLIC = {"/health", "/ready"}
SAMPLE = {
    "name": "tiny",
    "version": "1",
    "model": "tiny",
    "run_id": "r1",
    "evaluation_id": "1",
    "alert_id": "1",
    "feedback_id": "1",
    "key_id": "999",
    "item_id": "1",
    "split": "train",
    "index": "0",
}
SECRET = "TOPSECRET-do-not-serve"


def concrete(path: str, values: dict[str, str] = SAMPLE) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: values[m.group(1)], path)


@pytest.fixture(scope="module")
def ui_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ui")
    (d / "index.html").write_text("<html>genloop ui</html>")
    (d / "app.js").write_text("console.log('ui')")
    return d


@pytest.fixture(scope="module")
def server(
    module_ws: Workspace, ui_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    from genloop.workspace.datasets import register_dataset_version

    def write(d: Path) -> None:
        (d / "card.md").write_text("# card\n")
        (d / "samples.jsonl").write_text('{"id": "a", "text": "hello"}\n')

    register_dataset_version(module_ws, "corpus", "h" * 64, write)
    (module_ws.root / "secret.txt").write_text(SECRET)
    (module_ws.root / "artifacts" / "secret.txt").write_text(SECRET)
    mp = pytest.MonkeyPatch()
    mp.setattr("genloop.serve.app.UI_DIR", ui_dir)  # the web UI's hook: static files at /
    (ui_dir.parent / "secret.txt").write_text(SECRET)
    try:
        with running_server(module_ws, serve_config(), make_keys(module_ws)) as s:
            yield s
    finally:
        mp.undo()


def routes(server: LiveServer) -> dict[tuple[str, str], tuple[bool, str | None]]:
    found = route_scopes(server.app)
    assert ("POST", "/v1/chat/completions") in found and ("GET", "/v1/admin/runs") in found
    return found


def call(c: httpx.Client, method: str, path: str, key: str | None = None) -> httpx.Response:
    headers = auth(key) if key else {}
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return c.request(method, path, headers=headers, json=body)


def test_probes_answer_without_a_key_and_reveal_nothing(server: LiveServer) -> None:
    with server.client() as c:
        health, ready = c.get("/health"), c.get("/ready")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    for r in (health, ready):
        assert "tiny" not in r.text  # no model names, versions or counts


def test_every_route_without_a_key_is_401(server: LiveServer) -> None:
    checked = 0
    with server.client() as c:
        for (method, path), (guarded, _) in routes(server).items():
            if path in PUBLIC:
                continue
            assert guarded, f"{method} {path} has no key check"
            for key in (None, "gl_" + "A" * 43, "not-a-key"):
                r = call(c, method, concrete(path), key)
                assert r.status_code == 401, (method, path, key, r.text)
                err = r.json()["error"]
                assert err["type"] == "authentication_error" and set(err) == {
                    "message",
                    "type",
                    "param",
                    "code",
                }
                assert r.headers["www-authenticate"] == "Bearer"
            checked += 1
    assert checked >= 30


def test_every_route_with_the_wrong_scope_is_403(server: LiveServer) -> None:
    lacking = {
        "generate": "feedback",
        "feedback": "generate",
        "label": "client",
        "metrics": "client",
        "admin": "client",
    }
    checked = 0
    with server.client() as c:
        for (method, path), (_, scope) in routes(server).items():
            if path in PUBLIC:
                continue
            if scope is None:  # any valid key: /openapi.json
                r = call(c, method, concrete(path), server.keys["feedback"])
                assert r.status_code not in (401, 403), (method, path, r.text)
                continue
            r = call(c, method, concrete(path), server.keys[lacking[scope]])
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["type"] == "permission_error"
            checked += 1
    assert checked >= 30


def test_revoked_and_expired_keys_are_refused(server: LiveServer, module_ws: Workspace) -> None:
    from genloop.security.keys import create_key, revoke_key

    live = create_key(module_ws.catalog, name="short", scopes=["generate"])
    expired = create_key(
        module_ws.catalog, name="old", scopes=["generate"], expires_in=timedelta(seconds=1)
    )
    with server.client(live.plaintext) as c:
        assert c.get("/v1/models").status_code == 200
        revoke_key(module_ws.catalog, live.info.id)
        assert c.get("/v1/models").status_code == 401
    import time

    time.sleep(1.1)
    with server.client(expired.plaintext) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_public_routes_and_the_ui_need_no_key(server: LiveServer) -> None:
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert "genloop ui" in c.get("/").text
        assert c.get("/app.js").status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/openapi.json").status_code == 401
        missing = c.get("/v1/no-such-route")
        assert missing.status_code == 404 and "error" in missing.json()


def test_metrics_takes_a_metrics_key_or_admin_not_generate(
    server: LiveServer, module_ws: Workspace
) -> None:
    from genloop.security.keys import create_key

    scraper = create_key(module_ws.catalog, name="prometheus", scopes=["metrics"]).plaintext
    with server.client(scraper) as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "genloop:model_loads_total" in r.text
        # the scraper's key reads metrics only
        assert c.get("/v1/admin/runs").status_code == 403
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 403
    with server.client(server.keys["admin"]) as c:
        assert c.get("/metrics").status_code == 200
    with server.client(server.keys["generate"]) as c:
        r = c.get("/metrics")
        assert r.status_code == 403 and "'metrics'" in r.json()["error"]["message"]
    with server.client(server.keys["admin"]) as c:  # the admin API makes such keys too
        r = c.post("/v1/admin/keys", json={"name": "scrape2", "scopes": ["metrics"]})
        assert r.status_code in (200, 201) and r.json()["scopes"] == ["metrics"]


def test_metrics_can_be_made_public(served_ws: Workspace) -> None:
    cfg = serve_config(metrics_public=True)
    with running_server(served_ws, cfg, make_keys(served_ws)) as s, s.client() as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "genloop:model_loads_total" in r.text


def test_an_unguarded_route_is_refused_at_build_time(served_ws: Workspace) -> None:
    app = create_app(served_ws, serve_config())

    @app.get("/v1/leak")
    async def leak() -> dict[str, str]:
        return {}

    with pytest.raises(RuntimeError, match="GET /v1/leak"):
        check_routes_guarded(app, PUBLIC)


# ------------------------------------------------------------------ path traversal

TRAVERSALS = [
    "..",
    "../..",
    "../../secret.txt",
    "..%2f..%2fsecret.txt",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fsecret.txt",
    "..%5c..%5csecret.txt",
    "....//....//secret.txt",
    "%252e%252e%252fsecret.txt",
    "tiny%00.txt",
    "%c0%ae%c0%ae/secret.txt",
    "/etc/passwd",
    "tiny/../../../secret.txt",
    "1/../../secret.txt",
]


def raw_request(url: str, method: str, target: str, key: str | None) -> tuple[int, bytes]:
    """Send ``target`` byte for byte (HTTP clients normalise '..' away)."""
    host, port = url.removeprefix("http://").split(":")
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    body = b"{}" if method == "POST" else b""
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def test_path_traversal_never_reaches_a_file(server: LiveServer) -> None:
    targets: list[tuple[str, str]] = []
    for (method, path), _ in routes(server).items():
        params = re.findall(r"\{(\w+)(?::\w+)?\}", path)
        for param in params:
            for payload in TRAVERSALS:
                targets.append((method, concrete(path, SAMPLE | {param: payload})))
    for payload in TRAVERSALS:  # the static files at /, and query parameters naming things
        targets.append(("GET", "/" + payload))
        targets.append(("GET", f"/v1/admin/models?name={payload}"))
        targets.append(("GET", f"/v1/admin/models/diff?a={payload}&b=tiny@1"))
        targets.append(("GET", f"/v1/admin/evaluations?model={payload}"))
    assert len(targets) > 200
    for method, target in targets:
        status, data = raw_request(server.url, method, target, server.keys["admin"])
        assert SECRET.encode() not in data, (method, target)
        assert b"root:" not in data, (method, target)
        assert status < 500, (method, target, data[-300:])
        assert status != 200 or target.startswith("/v1/admin/models?"), (method, target)


def test_real_artifact_files_are_served_by_their_rows(server: LiveServer) -> None:
    with server.client(server.keys["admin"]) as c:
        card = c.get("/v1/admin/datasets/corpus/1/card")
        assert card.status_code == 200 and card.json()["markdown"] == "# card\n"
        samples = c.get("/v1/admin/datasets/corpus/1/samples").json()["data"]
        assert samples == [{"id": "a", "text": "hello"}]
        assert c.get("/v1/admin/datasets/corpus/2/card").status_code == 404
