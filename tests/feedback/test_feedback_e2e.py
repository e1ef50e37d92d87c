"""End to end on loopback: serve → generate → feedback (HTTP) → export → retrain → gate →
promote → the next request is served by the new version, with no restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from genloop.config import parse_config
from genloop.feedback.export import export_feedback
from genloop.feedback.retrain import retrain
from genloop.feedback.store import list_feedback
from genloop.security.crypto import Cipher
from genloop.security.keys import create_key
from genloop.workspace import Workspace
from genloop.workspace.tables import RequestLog

pytestmark = pytest.mark.integration
CITIES = ["paris", "rome", "oslo", "lima", "cairo"]


class LiveServer:
    """``create_app`` under uvicorn on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, ws: Workspace, model: str) -> None:
        from genloop.serve.app import create_app

        self.cfg = parse_config(
            {
                "serve": {"models": [model], "port": 0, "device": "cpu"},
                "security": {"guardrails": {"max_repetition": None}},
            }
        )
        self.app = create_app(ws, self.cfg, poll_interval_s=0.2)
        self.url = ""

    def __enter__(self) -> LiveServer:
        import uvicorn

        from genloop.cli.serve import uvicorn_config

        self.server = uvicorn.Server(uvicorn_config(self.app, self.cfg.serve))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture
def served(ws: Workspace, new_model: Any) -> Iterator[tuple[Any, httpx.Client]]:
    model = new_model("served")
    key = create_key(ws.catalog, name="app", scopes=["generate", "feedback"]).plaintext
    with (
        LiveServer(ws, f"{model.name}@production") as server,
        httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client,
    ):
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.05)
        yield model, client


def complete(client: httpx.Client, model: str, city: str) -> dict[str, Any]:
    prompt = f"Q: what colour is the sky over {city}? A:"
    r = client.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_feedback_over_http_retrains_and_the_server_swaps_to_the_new_version(
    ws: Workspace, cipher: Cipher, served: tuple[Any, httpx.Client], config: Any
) -> None:
    model, client = served
    ref = f"{model.name}@production"

    # users generate, and correct what they got, through the API
    for i, city in enumerate(CITIES):
        answer = complete(client, ref, city)
        assert answer["model"] == model.ref
        r = client.post(
            "/v1/feedback",
            json={
                "response_id": answer["id"],
                "rating": -1,
                "correction": " blue.",
                "user": f"user{i}",
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "pending"
    r = client.post("/v1/feedback", json={"response_id": "cmpl-unknown", "rating": 1})
    assert r.status_code == 404 and "no response with id" in r.json()["error"]["message"]
    r = client.post("/v1/feedback", json={"response_id": answer["id"], "rating": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rating"  # OpenAI-style

    rows = list_feedback(ws, model=model.name)
    assert len(rows) == len(CITIES) and {f.model for f in rows} == {model.ref}
    assert {f.user_id for f in rows} == {f"user{i}" for i in range(len(CITIES))}

    # export, retrain, gate, promote
    exported = export_feedback(ws, cipher, "sft", model=model.name)
    assert exported.rows == len(CITIES)
    result = retrain(ws, cipher, ref, config())
    assert result.outcome == "promoted", result.reason
    new = result.promoted
    assert new == f"{model.name}@2"

    # the running server picks the new version up: the next request is served by it
    deadline = time.monotonic() + 30
    while (answer := complete(client, ref, "quito"))["model"] != new:
        assert time.monotonic() < deadline, f"still served by {answer['model']}"
        time.sleep(0.2)
    listed = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["version"]) for m in listed] == [(ref, 2)]
    client.post("/v1/feedback", json={"response_id": answer["id"], "rating": 1})  # flushes logs
    with ws.catalog.session() as s:
        logged = s.get(RequestLog, answer["id"])
        assert logged is not None and logged.model_version == 2
