"""While the catalog database cannot be reached (PostgreSQL restarting), routes that need it
answer 503 with ``Retry-After``, never a 500, and answer normally once it is back."""

from __future__ import annotations

import socket

from genloop.workspace import Workspace
from genloop.workspace.db import Catalog

from .conftest import make_keys, running_server, serve_config


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: connecting is refused, as while PostgreSQL restarts


def test_an_unreachable_catalog_is_a_503_with_retry_after(served_ws: Workspace) -> None:
    keys = make_keys(served_ws)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with running_server(served_ws, serve_config(), keys) as s:
        live = served_ws.catalog
        dead = Catalog(f"postgresql://genloop@127.0.0.1:{closed_port()}/genloop")
        served_ws.catalog = dead
        try:
            with s.client(keys["client"]) as c:  # a key not seen yet: checked in the catalog
                r = c.post("/v1/chat/completions", json=body)
            with s.client(keys["admin"]) as c:  # a key already checked: the route's query
                r_admin = c.get("/v1/admin/models")
        finally:
            served_ws.catalog = live
            dead.dispose()
        for resp in (r, r_admin):
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "2"
            error = resp.json()["error"]
            assert error["code"] == "catalog_unavailable"
            assert "127.0.0.1" not in error["message"]  # nothing of the internals
        with s.client(keys["client"]) as c:
            assert c.post("/v1/chat/completions", json=body).status_code == 200
