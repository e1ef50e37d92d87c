"""Per-key quotas on live servers: two replicas sharing Redis enforce one budget, a key's
own limits beat the defaults, 429 names the limit with Retry-After, and a Redis outage is
fail-closed (503) or local, with one alert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from genloop.workspace import Workspace

from ..security.conftest import redis_prefix, redis_url  # noqa: F401 (fixtures)
from .conftest import make_keys, running_server, serve_config

CLOSED_PORT_URL = "redis://127.0.0.1:1/0"  # nothing listens there


def completion(c: httpx.Client, **kw: object) -> httpx.Response:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0} | kw
    return c.post("/v1/completions", json=body)


def _seconds_to_midnight() -> float:
    now = datetime.now(UTC)
    return (
        now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) - now
    ).total_seconds()


@pytest.mark.redis
def test_two_replicas_sharing_redis_enforce_one_budget_per_key(
    served_ws: Workspace,
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    from genloop.security.keys import set_key_limits

    cfg = serve_config(
        redis_url=redis_url,
        rate_limit={"requests_per_min": 600, "tokens_per_min": None, "redis_prefix": redis_prefix},
    )
    keys = make_keys(served_ws)
    set_key_limits(served_ws.catalog, "generate", {"requests_per_min": 3})  # beats the 600
    with running_server(served_ws, cfg, keys) as a, running_server(served_ws, cfg, keys) as b:
        clients = [a.client(keys["generate"]), b.client(keys["generate"])]
        codes = [clients[i % 2].get("/v1/models").status_code for i in range(4)]
        assert codes == [200, 200, 200, 429]  # 3 per minute for the key, not 3 per replica
        refused = clients[0].get("/v1/models")
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert "requests per minute: 3 used of 3; retry in" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 20

        # a key's own limits set through the admin API (0: no limit for this key)
        with b.client(keys["admin"]) as admin:
            listed = admin.get("/v1/admin/keys")
            assert listed.status_code == 200, listed.text
            key_id = next(k["id"] for k in listed.json()["data"] if k["name"] == "client")
            patched = admin.patch(
                f"/v1/admin/keys/{key_id}/limits",
                json={"requests_per_min": 0, "tokens_per_day": 40},
            )
            assert patched.status_code == 200, patched.text
            assert patched.json()["limits"]["tokens_per_day"] == 40
            bad = admin.patch(f"/v1/admin/keys/{key_id}/limits", json={"tokens_per_day": -1})
            assert bad.status_code == 400 and "tokens_per_day" in bad.text
        first = completion(a.client(keys["client"]), max_tokens=10)
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]  # settled to this, not the reservation
        assert first.json()["usage"]["completion_tokens"] == 10
        assert [b.client(keys["client"]).get("/v1/models").status_code for _ in range(4)] == [
            200
        ] * 4
        # prompt + max_tokens is reserved up front: 30 more does not fit in what is left
        over = completion(b.client(keys["client"]), max_tokens=30)
        assert over.status_code == 429
        error = over.json()["error"]
        assert error["code"] == "insufficient_quota"
        assert f"tokens per day: {used} used of 40, this request needs up to" in error["message"]
        assert "resets in" in error["message"]
        assert abs(int(over.headers["retry-after"]) - _seconds_to_midnight()) < 30
        # what the first request did not use came back: a small one still fits
        assert completion(a.client(keys["client"]), max_tokens=2).status_code == 200
        for c in clients:
            c.close()


def test_redis_down_fails_closed_for_clients_with_one_alert(served_ws: Workspace) -> None:
    cfg = serve_config(redis_url=CLOSED_PORT_URL)
    keys = make_keys(served_ws)
    with running_server(served_ws, cfg, keys) as s:  # ready: /ready is not a client route
        with s.client(keys["client"]) as c:
            for _ in range(3):
                r = completion(c)
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "rate_limits_unavailable"
                assert "Redis" in r.json()["error"]["message"]
                assert "fail_closed" in r.json()["error"]["message"]
                assert r.headers["retry-after"] == "1"
            assert c.get("/v1/models").status_code == 503
        with s.client(keys["admin"]) as admin:  # operators can still look
            alerts = admin.get("/v1/admin/alerts").json()["data"]
    mine = [a for a in alerts if a["kind"] == "rate_limits_unavailable"]
    assert len(mine) == 1  # once per outage, not once per request
    assert mine[0]["severity"] == "critical" and "refused with 503" in mine[0]["message"]
    assert "127.0.0.1:1" not in mine[0]["message"]


def test_redis_down_with_local_fallback_limits_each_process(served_ws: Workspace) -> None:
    from genloop.security.keys import set_key_limits

    cfg = serve_config(redis_url=CLOSED_PORT_URL, rate_limit={"on_redis_down": "local"})
    keys = make_keys(served_ws)
    set_key_limits(served_ws.catalog, "client", {"requests_per_min": 2})
    with running_server(served_ws, cfg, keys) as s, s.client(keys["client"]) as c:
        codes = [c.get("/v1/models").status_code for _ in range(3)]
        assert codes == [200, 200, 429]  # the key's 2 per minute, kept by this process
        with s.client(keys["admin"]) as admin:
            alerts = admin.get("/v1/admin/alerts").json()["data"]
    mine = [a for a in alerts if a["kind"] == "rate_limits_unavailable"]
    assert len(mine) == 1 and mine[0]["severity"] == "warning"
    assert "each replica limits keys on its own" in mine[0]["message"]
