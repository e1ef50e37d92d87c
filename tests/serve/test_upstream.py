"""Routing a model name to upstream OpenAI-compatible servers: here a second genloop
replica sharing the catalog, behind a front server that serves nothing itself."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import openai
import pytest

from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, running_server, serve_config


def dead_url() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def keys(module_ws: Workspace) -> dict[str, str]:
    return make_keys(module_ws)


@pytest.fixture(scope="module")
def replica(module_ws: Workspace, keys: dict[str, str]) -> Iterator[LiveServer]:
    with running_server(module_ws, serve_config(), keys) as s:
        yield s


@pytest.fixture(scope="module")
def front(module_ws: Workspace, keys: dict[str, str], replica: LiveServer) -> Iterator[LiveServer]:
    cfg = serve_config(
        models=[],
        upstreams={"tiny": [dead_url(), replica.url]},
        upstream_health_interval_s=60,
    )
    with running_server(module_ws, cfg, keys) as s:
        yield s


def test_requests_reach_the_replica_with_the_same_key(
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
