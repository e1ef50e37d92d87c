"""Routing a model name to upstream OpenAI-compatible servers: here a second genloop
replica sharing the catalog, behind a front server that serves nothing itself. The front
sends each upstream the upstream's own key (from the environment), never the caller's."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest

from genloop.errors import ConfigError
from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, running_server, serve_config, wait_for_request_row


def dead_url() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


UPSTREAM_ENV = "GENLOOP_TEST_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def keys(module_ws: Workspace) -> Iterator[dict[str, str]]:
    from genloop.security.keys import create_key

    keys = make_keys(module_ws)
    # the front's own key at the replica: a generate-only key the callers never see
    keys["upstream"] = create_key(module_ws.catalog, name="front", scopes=["generate"]).plaintext
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(UPSTREAM_ENV, keys["upstream"])
        yield keys


@pytest.fixture(scope="module")
def replica(module_ws: Workspace, keys: dict[str, str]) -> Iterator[LiveServer]:
    with running_server(module_ws, serve_config(), keys) as s:
        yield s


@pytest.fixture(scope="module")
def front(module_ws: Workspace, keys: dict[str, str], replica: LiveServer) -> Iterator[LiveServer]:
    cfg = serve_config(
        models=[],
        upstreams={"tiny": [dead_url(), {"url": replica.url, "api_key_env": UPSTREAM_ENV}]},
        upstream_health_interval_s=60,
    )
    with running_server(module_ws, cfg, keys) as s:
        yield s


def test_requests_reach_the_replica_with_its_own_key(
    front: LiveServer, replica: LiveServer
) -> None:
    with openai.OpenAI(
        base_url=front.url + "/v1", api_key=front.keys["client"], max_retries=0
    ) as c:
        assert [m.id for m in c.models.list().data] == ["tiny"]
        raw = c.completions.with_raw_response.create(
            model="tiny", prompt="Hello", max_tokens=5, temperature=0
        )
        assert raw.headers["x-genloop-upstream"] == replica.url
        r = raw.parse()
        assert r.model == "tiny@1" and r.usage is not None and r.usage.completion_tokens == 5
        chunks = list(
            c.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=6,
                temperature=0,
                stream=True,
            )
        )
        whole = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == (
            whole.choices[0].message.content
        )
        with pytest.raises(openai.BadRequestError) as err:  # the replica's 400, passed on
            c.completions.create(model="tiny", prompt="Hi", n=99)
        assert err.value.body["param"] == "n"
        # structured outputs go on to the replica, which holds the answer to the schema
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        r = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}},
        )
        assert isinstance(json.loads(r.choices[0].message.content or "")["ok"], bool)


def test_the_front_checks_keys_itself(front: LiveServer) -> None:
    with front.client() as c:
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    with front.client(front.keys["feedback"]) as c:
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 403


def test_failover_skips_an_upstream_that_is_down(front: LiveServer) -> None:
    router = front.state.upstreams
    status = router.status()["tiny"]
    assert [u["healthy"] for u in status] == [False, True]  # the first health check saw it
    for up in router.routes["tiny"]:
        up.healthy = True  # as if it had just gone down, unnoticed
    with front.client(front.keys["client"]) as c:
        for _ in range(4):  # round robin starts at each upstream in turn
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
            assert c.post("/v1/completions", json=body).status_code == 200
    assert [u.healthy for u in router.routes["tiny"]] == [False, True]
    with front.client(front.keys["admin"]) as a:
        ups = a.get("/v1/admin/status").json()["upstreams"]["tiny"]
        assert ups[0]["healthy"] is False and ups[0]["last_error"]


def test_all_upstreams_down_is_503_with_retry_after(
    module_ws: Workspace, keys: dict[str, str]
) -> None:
    cfg = serve_config(models=[], upstreams={"tiny": [dead_url(), dead_url()]})
    with running_server(module_ws, cfg, keys) as s, s.client(keys["client"]) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "stream": True})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "upstream_unavailable"
        assert json.loads(c.get("/v1/models").text)["data"][0]["healthy"] is False


def test_the_replica_sees_the_fronts_key_never_the_callers(
    module_ws: Workspace, front: LiveServer, replica: LiveServer
) -> None:
    from genloop.security.keys import list_keys

    key_ids = {k.name: k.id for k in list_keys(module_ws.catalog)}
    for caller in ("client", "admin"):  # an admin caller's key must not leave either
        with front.client(front.keys[caller]) as c:
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-genloop-upstream"] == replica.url
        row = wait_for_request_row(module_ws, r.json()["id"])
        assert row.api_key_id == key_ids["front"]


@contextmanager
def header_recorder() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A tiny real OpenAI-shaped server on loopback that records the headers it gets."""
    import threading
    import time

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    seen: list[dict[str, str]] = []

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def completions(request: Request) -> JSONResponse:
        seen.append(dict(request.headers))
        return JSONResponse({"id": "cmpl-rec", "object": "text_completion", "choices": []})

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "recorder did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_each_upstream_gets_exactly_its_own_key(
    module_ws: Workspace,
    keys: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from genloop.security.secret_store import set_secret

    monkeypatch.setenv("GENLOOP_TEST_OTHER_KEY", "sk-other-upstream-secret")
    set_secret(module_ws, "stored-key", "sk-stored-upstream-secret")
    with header_recorder() as (url, seen):
        cfg = serve_config(
            models=[],
            upstreams={
                "with-key": [{"url": url, "api_key_env": "GENLOOP_TEST_OTHER_KEY"}],
                "no-key": [url],
                "stored": [{"url": url, "api_key_secret": "stored-key"}],
            },
        )
        with running_server(module_ws, cfg, keys) as s:
            for model in ("with-key", "no-key", "stored"):
                with s.client(keys["admin"]) as c:
                    r = c.post("/v1/completions", json={"model": model, "prompt": "Hi"})
                    assert r.status_code == 200, r.text
            assert "sk-" not in repr(s.state.upstreams.routes)
            assert "sk-" not in str(s.state.upstreams.status())
    assert seen[0]["authorization"] == "Bearer sk-other-upstream-secret"
    assert "authorization" not in seen[1]
    assert seen[2]["authorization"] == "Bearer sk-stored-upstream-secret"
    assert all(keys["admin"] not in str(h) for h in seen)
    assert "upstream-secret" not in caplog.text


def test_an_unset_key_variable_is_a_clear_error(
    module_ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genloop.serve.app import create_app

    monkeypatch.delenv("GENLOOP_TEST_UNSET_KEY", raising=False)
    cfg = serve_config(
        models=[],
        upstreams={
            "big": [{"url": "https://gpu.internal/v1", "api_key_env": "GENLOOP_TEST_UNSET_KEY"}]
        },
    )
    with pytest.raises(
        ConfigError, match=r"serve\.upstreams\.big\[0\]\.api_key_env.*GENLOOP_TEST_UNSET_KEY"
    ):
        create_app(module_ws, cfg)


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("http://10.0.0.5:8000/v1", r"serve\.upstreams\.big\[0\].*plain http.*allow_http"),
        ({"url": "http://gpu.internal/v1"}, r"serve\.upstreams\.big\[0\].*allow_http: true"),
        (
            "https://user:pw@gpu.internal/v1",
            r"serve\.upstreams\.big\[0\].*credentials.*api_key_env",
        ),
        ({"url": "https://gpu.internal/v1", "api_key_env": "not a name"}, r"api_key_env"),
        (
            {"url": "https://gpu.internal/v1", "api_key_env": "K", "api_key_secret": "k"},
            r"api_key_env or api_key_secret, not both",
        ),
    ],
)
def test_bad_upstream_entries_are_refused_at_config_load(entry: Any, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        serve_config(models=[], upstreams={"big": [entry]})


def test_https_loopback_and_allowed_http_upstreams_load() -> None:
    cfg = serve_config(
        models=[],
        upstreams={
            "big": [
                "https://gpu.internal/v1",
                "http://127.0.0.1:8000/v1",
                "http://localhost:8000",
                "http://[::1]:8000",
                {"url": "http://10.0.0.5:8000/v1", "allow_http": True, "api_key_env": "K"},
            ]
        },
    )
    ups = cfg.serve.upstreams["big"]
    assert [u.allow_http for u in ups] == [False, False, False, False, True]
    assert ups[4].api_key_env == "K" and ups[0].api_key_env is None


def test_a_missing_stored_secret_is_a_clear_error(module_ws: Workspace) -> None:
    from genloop.serve.app import create_app

    cfg = serve_config(
        models=[], upstreams={"big": [{"url": "https://gpu.internal/v1", "api_key_secret": "nope"}]}
    )
    with pytest.raises(
        ConfigError, match=r"serve\.upstreams\.big\[0\]\.api_key_secret: no secret 'nope'"
    ):
        create_app(module_ws, cfg)
