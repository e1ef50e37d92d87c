"""``/v1/label``: the labeling queue over HTTP, behind keys and the ``label`` scope."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from genloop.feedback.labeling.tasks import create_task
from genloop.workspace import Workspace
from genloop.workspace.audit import list_events

from .conftest import LiveServer, running_server, serve_config

TEXTS = ["a lovely quiet film", "dull and far too long", "the cast is wonderful"]


@pytest.fixture(scope="module")
def server(module_ws: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from genloop.security.keys import create_key

    file = tmp_path_factory.mktemp("label") / "reviews.jsonl"
    rows = [{"text": t} | ({"label": "pos"} if i == 0 else {}) for i, t in enumerate(TEXTS)]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    create_task(module_ws, "reviews", "classification", file=file, labels=["pos", "neg"])
    keys = {
        "alice": create_key(
            module_ws.catalog, name="alice-laptop", scopes=["label"], user_id="alice"
        ),
        "bob": create_key(module_ws.catalog, name="bob", scopes=["label"]),
        "generate": create_key(module_ws.catalog, name="client", scopes=["generate"]),
        "admin": create_key(module_ws.catalog, name="ops", scopes=["admin"]),
    }
    plain = {k: v.plaintext for k, v in keys.items()}
    with running_server(module_ws, serve_config(), plain) as live:
        yield live


def client(server: LiveServer, who: str) -> httpx.Client:
    return server.client(server.keys[who])


def test_routes_need_a_key_with_the_label_scope(server: LiveServer) -> None:
    with server.client() as anonymous:
        assert anonymous.get("/v1/label/tasks").status_code == 401
        missing = anonymous.post("/v1/label/tasks/reviews/items/1/labels", json={"value": {}})
        assert missing.status_code == 401
    with client(server, "generate") as c:
        refused = c.get("/v1/label/tasks/reviews/next")
        assert refused.status_code == 403
        assert "lacks the 'label' scope" in refused.json()["error"]["message"]
    with client(server, "admin") as c:  # admin implies label
        assert c.get("/v1/label/tasks").status_code == 200


def test_next_submit_once_and_agreement(module_ws: Workspace, server: LiveServer) -> None:
    with client(server, "alice") as alice, client(server, "bob") as bob:
        tasks = alice.get("/v1/label/tasks").json()
        assert tasks["annotator"] == "alice"  # the key's user id
        (task,) = [t for t in tasks["data"] if t["name"] == "reviews"]
        assert task["label_set"] == ["pos", "neg"] and task["progress"]["you"]["remaining"] == 3

        nxt = alice.get("/v1/label/tasks/reviews/next").json()
        item = nxt["item"]
        assert (item["position"], item["payload"]["text"], item["prelabel"]) == (
            0,
            TEXTS[0],
            {"label": "pos"},
        )
        url = f"/v1/label/tasks/reviews/items/{item['id']}/labels"
        made = alice.post(url, json={"value": {"label": "pos"}})
        assert made.status_code == 201, made.text
        assert made.json()["annotator"] == "alice" and made.json()["prelabel_accepted"] is True

        again = alice.post(url, json={"value": {"label": "neg"}})
        assert again.status_code == 409
        assert again.json()["error"]["type"] == "conflict_error"
        assert "already labeled by alice" in again.json()["error"]["message"]

        other = f"/v1/label/tasks/reviews/items/{item['id'] + 1}/labels"
        bad = alice.post(other, json={"value": {"label": "meh"}})
        assert bad.status_code == 422 and "not in the label set" in bad.json()["error"]["message"]
        # the annotator is the key's, never the client's
        posing = bob.post(url, json={"value": {"label": "neg"}, "annotator": "alice"})
        assert posing.status_code == 400 and "annotator" in posing.text
        assert (
            bob.post(
                "/v1/label/tasks/reviews/items/999999/labels", json={"value": {"label": "pos"}}
            ).status_code
            == 404
        )
        assert bob.get("/v1/label/tasks/nope/next").status_code == 404
        assert bob.get("/v1/label/tasks/..%2Fx/next").status_code in (404, 422)

        # bob: the next new item, or a second opinion on alice's
        assert bob.get("/v1/label/tasks/reviews/next").json()["item"]["position"] == 1
        second = bob.get("/v1/label/tasks/reviews/next", params={"agreement": "true"}).json()
        assert second == {"item": item, "annotator": "bob"}  # a key without a user id: its name
        assert bob.post(url, json={"value": {"label": "neg"}}).status_code == 201

        shown = alice.get("/v1/label/tasks/reviews").json()["progress"]
    assert shown["annotators"] == {"alice": 1, "bob": 1} and shown["labels"] == 2
    assert shown["agreement"] == [
        {"annotators": ["alice", "bob"], "items": 1, "observed": 0.0, "kappa": 0.0}
    ]
    assert shown["you"] == {"annotator": "alice", "labeled": 1, "remaining": 2}
    events = list_events(module_ws, action="label.submit")
    assert len(events) == 2 and all(e["actor"].startswith("key:gl_") for e in events)
