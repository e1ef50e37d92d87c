"""Live swaps: promoting a version (or rolling back) moves NAME@production to it without
dropping requests in flight; a version that fails to load leaves the old one serving."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from genloop.workspace import Workspace, registry

from .conftest import LiveServer, make_keys, running_server, serve_config


def greedy(s: LiveServer, model: str) -> tuple[str, str]:
    with s.client(s.keys["client"]) as c:
        r = c.post(
            "/v1/completions",
            json={"model": model, "prompt": "Hello", "max_tokens": 12, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        return r.json()["model"], r.json()["choices"][0]["text"]


def test_a_swap_during_a_stream_finishes_it_on_the_old_version(served_ws: Workspace) -> None:
    cfg = serve_config(models=["tiny@production", "tiny@2"])
    keys = make_keys(served_ws)
    with running_server(served_ws, cfg, keys, poll_interval_s=0.2) as s:
        old_ref, old_text = greedy(s, "tiny@production")
        new_ref, new_text = greedy(s, "tiny@2")
        assert (old_ref, new_ref) == ("tiny@1", "tiny@2") and old_text != new_text

        events: list[Any] = []
        first = threading.Event()

        def stream() -> None:
            body = {
                "model": "tiny@production",
                "prompt": "Hello",  # greedy: "ooo…", no end of text
                "max_tokens": 500,
                "temperature": 0,
                "stream": True,
            }
            with s.client(keys["client"]) as c, c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        events.append(data if data == "[DONE]" else json.loads(data))
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(timeout=30)
        with s.client(keys["admin"]) as a:
            r = a.post("/v1/admin/models/tiny/promote", json={"version": 2, "reason": "test"})
            assert r.status_code == 200 and r.json()["version"] == 2
        assert "[DONE]" not in events  # the alias moved while the stream was running
        # the very next request resolves the alias again and gets the new weights
        assert greedy(s, "tiny@production") == (new_ref, new_text)
        t.join(timeout=60)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert {e["model"] for e in chunks} == {"tiny@1"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in chunks if e["choices"][0]["finish_reason"] is None) == 500

        # the old version is unloaded once its last request is done
        deadline = time.monotonic() + 10
        while s.state.models._retired:
            assert time.monotonic() < deadline, "the old engine was never unloaded"
            time.sleep(0.05)
        with s.client(keys["admin"]) as a:
            metrics = a.get("/metrics").text
            assert 'genloop:model_swaps_total{model_name="tiny",model_version="2"} 1.0' in metrics
            assert a.post("/v1/admin/models/tiny/rollback", json={}).json()["version"] == 1
        assert greedy(s, "tiny@production") == (old_ref, old_text)


def test_the_catalog_poll_swaps_without_any_request(served_ws: Workspace) -> None:
    keys = make_keys(served_ws)
    with running_server(served_ws, serve_config(), keys, poll_interval_s=0.2) as s:
        registry.promote(served_ws, "tiny@2", "production")
        deadline = time.monotonic() + 15
        with s.client(keys["client"]) as c:
            while c.get("/v1/models").json()["data"][0]["ref"] != "tiny@2":
                assert time.monotonic() < deadline, "the poll never swapped"
                time.sleep(0.05)


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(
    served_ws: Workspace, model_dirs: tuple[Any, Any]
) -> None:
    keys = make_keys(served_ws)
    broken = registry.register_model(served_ws, "tiny", "causal_lm", model_dirs[1])
    weights = served_ws.store.path(broken.artifact) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")  # fails its manifest
    with running_server(served_ws, serve_config(), keys, poll_interval_s=0.2) as s:
        registry.promote(served_ws, broken.ref, "production")
        ref, _ = greedy(s, "tiny@production")
        assert ref == "tiny@1"
        with s.client(keys["admin"]) as a:
            status = a.get("/v1/admin/status").json()["models"][0]
        assert status["ref"] == "tiny@1" and status["error"]
        registry.promote(served_ws, "tiny@2", "production")  # a good version loads fine
        assert greedy(s, "tiny@production")[0] == "tiny@2"
