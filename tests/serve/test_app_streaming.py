"""The engine behind the API under load: queue overflow, client disconnects, timeouts,
several choices streamed together, and what each request leaves in usage and metrics."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, running_server, serve_config, wait_for_request_row

LONG = {"model": "tiny", "prompt": "Hello", "max_tokens": 500, "temperature": 0}


def sse_events(r: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def engine_idle(server: LiveServer, timeout: float = 10.0) -> float:
    """Seconds until the served engine has nothing running or waiting."""
    start = time.monotonic()
    with server.client(server.keys["admin"]) as c:
        while True:
            engine = c.get("/v1/admin/status").json()["models"][0]["engine"]
            if engine["running"] == 0 and engine["waiting"] == 0:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, engine
            time.sleep(0.02)


def test_queue_overflow_gives_exactly_the_expected_number_of_429s(served_ws: Workspace) -> None:
    # one running + two waiting fit; of eight requests sent at once, five must be refused
    cfg = serve_config(max_batch_size=1, max_queue=2)
    keys = make_keys(served_ws)
    with running_server(served_ws, cfg, keys) as s:
        gate = threading.Barrier(8)
        results: list[tuple[int, str | None, list[Any]]] = []

        def one() -> None:
            with s.client(keys["client"]) as c:
                gate.wait(timeout=30)
                body = LONG | {"stream": True, "max_tokens": 300}
                with c.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code == 200:
                        results.append((200, None, sse_events(r)))
                    else:
                        r.read()
                        results.append((r.status_code, r.headers.get("retry-after"), [r.json()]))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        codes = sorted(code for code, _, _ in results)
        assert codes == [200] * 3 + [429] * 5, codes
        for code, retry_after, events in results:
            if code == 429:
                assert retry_after is not None and int(retry_after) >= 1
                assert events[0]["error"]["type"] == "rate_limit_error"
            else:
                assert events[-1] == "[DONE]"
                assert events[-2]["choices"][0]["finish_reason"] == "length"
                assert sum(1 for e in events[:-1] if e["choices"][0]["text"]) > 0


def test_a_disconnect_frees_the_slot(served_ws: Workspace) -> None:
    cfg = serve_config(max_batch_size=1, max_queue=0)
    keys = make_keys(served_ws)
    with running_server(served_ws, cfg, keys) as s:
        # streamed: read a few chunks, then hang up
        with (
            s.client(keys["client"]) as c,
            c.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as r,
        ):
            lines = r.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            rid = first["id"]
            assert r.headers["x-request-id"] == rid
        engine_idle(s)
        with s.client(keys["client"]) as c:  # the only slot is free again
            assert c.post("/v1/completions", json=LONG | {"max_tokens": 2}).status_code == 200
        row = wait_for_request_row(served_ws, rid)
        assert row.status == 499 and row.completion_tokens < 500

        # not streamed: the client gives up waiting, long before the generation is done
        with s.client(keys["client"]) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=LONG, timeout=0.02)
        engine_idle(s)
        with s.client(keys["client"]) as c:
            assert c.post("/v1/completions", json=LONG | {"max_tokens": 2}).status_code == 200


def test_request_timeout_ends_requests(served_ws: Workspace) -> None:
    cfg = serve_config(request_timeout_s=0.3, max_tokens=1000)
    keys = make_keys(served_ws)
    long = LONG | {"max_tokens": 1000}
    with running_server(served_ws, cfg, keys) as s, s.client(keys["client"]) as c:
        r = c.post("/v1/completions", json=long)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with c.stream("POST", "/v1/completions", json=long | {"stream": True}) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"


def test_several_choices_stream_together(served_ws: Workspace) -> None:
    keys = make_keys(served_ws)
    with running_server(served_ws, serve_config(), keys) as s, s.client(keys["client"]) as c:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "n": 3,
            "seed": 5,
            "stream": True,
        }
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = sse_events(r)
        chunks = [e for e in events[:-1] if e["choices"]]
        ends = {e["choices"][0]["index"] for e in chunks if e["choices"][0]["finish_reason"]}
        assert ends == {0, 1, 2}
        texts = {
            i: "".join(
                e["choices"][0]["delta"].get("content", "")
                for e in chunks
                if e["choices"][0]["index"] == i
            )
            for i in range(3)
        }
        whole = c.post("/v1/chat/completions", json=body | {"stream": False}).json()
        assert {ch["index"]: ch["message"]["content"] for ch in whole["choices"]} == texts


def test_usage_and_metrics_follow_the_requests(served_ws: Workspace) -> None:
    keys = make_keys(served_ws)
    with running_server(served_ws, serve_config(), keys) as s:
        with s.client(keys["client"]) as c:
            for _ in range(3):
                assert c.post("/v1/completions", json=LONG | {"max_tokens": 5}).status_code == 200
            assert c.post("/v1/completions", json=LONG | {"n": 99}).status_code == 400
        with s.client(keys["admin"]) as a:
            metrics = a.get("/metrics").text
            assert (
                'genloop:requests_total{model_name="tiny",model_version="1",status="200"} 3.0'
                in metrics
            )
            assert (
                'genloop:generation_tokens_total{model_name="tiny",model_version="1"} 15.0'
                in metrics
            )
            deadline = time.monotonic() + 10
            while True:
                usage = a.get("/v1/admin/usage", params={"by": "model"}).json()
                totals = {u["model"]: u for u in usage["summary"]}
                if totals.get("tiny", {}).get("requests") == 3:
                    break
                assert time.monotonic() < deadline, usage
                time.sleep(0.05)
            assert totals["tiny"]["completion_tokens"] == 15
