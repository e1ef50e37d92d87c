"""Feedback identity is the API key, not the ``user`` label: one key that varies ``user``
is still one user for the per-user cap, the majority votes and erasure (real server on
loopback, feedback over HTTP)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, running_server, serve_config


@pytest.fixture(scope="module")
def server(module_ws: Workspace) -> Iterator[LiveServer]:
    from genloop.security.keys import create_key

    keys = make_keys(module_ws)
    for name, user in (("spammer", None), ("other", None), ("bob-app", "bob")):
        keys[name] = create_key(
            module_ws.catalog, name=name, scopes=["generate", "feedback"], user_id=user
        ).plaintext
    with running_server(module_ws, serve_config(), keys) as s:
        yield s


def _respond_and_rate(server: LiveServer, key: str, labels: list[str | None]) -> str:
    # a prompt of its own per key: sampled answers that happen to agree would bring the
    # vote and correction majorities of curation into a test of the per-user cap
    prompt = f"Q: what does {key[-8:]} say? A:"
    with server.client(key) as c:
        # a random tiny model may end at once: curation drops an empty answer, so take the
        # first seed whose answer has text
        for seed in range(20):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "seed": seed}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            if r.json()["choices"][0]["text"].strip():
                break
        else:
            raise AssertionError("20 seeds, no answer with text")
        rid = r.json()["id"]
        for i, label in enumerate(labels):
            body = {"response_id": rid, "rating": -1, "correction": f" answer {i} from {key[:6]}"}
            if label is not None:
                body["user"] = label
            fb = c.post("/v1/feedback", json=body)
            assert fb.status_code == 200, fb.text
    return rid


def test_caps_and_curation_count_the_key_not_the_user_label(
    server: LiveServer, module_ws: Workspace
) -> None:
    from genloop.config import FeedbackConfig
    from genloop.feedback.curate import curate, load_items
    from genloop.feedback.loop import pending_counts
    from genloop.feedback.store import list_feedback
    from genloop.security.keys import list_keys

    ids = {k.name: k.id for k in list_keys(module_ws.catalog)}
    _respond_and_rate(server, server.keys["spammer"], [f"user-{i}" for i in range(5)])
    _respond_and_rate(server, server.keys["other"], [None])
    _respond_and_rate(server, server.keys["bob-app"], ["carol"])

    shown = list_feedback(module_ws)
    # the label stays what the client sent (shown in lists) …
    assert sorted(f.user_id or "" for f in shown) == sorted(
        ["carol", "", *(f"user-{i}" for i in range(5))]
    )
    # … but who counts is the key: one principal for the five labels
    items = load_items(module_ws, server.state.cipher, statuses=["pending"], model="tiny")
    assert sorted({it.user for it in items}) == sorted(
        [f"key:{ids['spammer']}", f"key:{ids['other']}", "user:bob"]
    )
    kept, report = curate(items, per_user_cap=2)
    assert report.dropped.get("user_cap") == 3, report
    assert sum(it.user == f"key:{ids['spammer']}" for it in kept) == 2
    new, _ = pending_counts(module_ws, "tiny", FeedbackConfig(per_user_cap=2))
    assert new == 2 + 1 + 1


def test_erasure_reaches_what_a_users_keys_sent_under_any_label(
    server: LiveServer, module_ws: Workspace
) -> None:
    from genloop.feedback.store import list_feedback
    from genloop.security.privacy import erase_user, export_user

    # bob's key rates a response someone else asked for, labelled as another user
    with server.client(server.keys["other"]) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        rid = r.json()["id"]
    with server.client(server.keys["bob-app"]) as c:
        body = {"response_id": rid, "rating": -1, "correction": "bob wrote this", "user": "dave"}
        assert c.post("/v1/feedback", json=body).status_code == 200

    exported = export_user(module_ws, "bob", server.state.cipher)
    assert "bob wrote this" in [f["correction"] for f in exported["feedback"]]
    assert [f.user_id for f in list_feedback(module_ws)].count("dave") == 1
    erase_user(module_ws, "bob", cipher=server.state.cipher)
    assert "dave" not in [f.user_id for f in list_feedback(module_ws)]
    assert export_user(module_ws, "bob", server.state.cipher)["feedback"] == []
