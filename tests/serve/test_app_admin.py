"""The admin API (scope admin) that the web UI and scripts use: runs and metric series,
datasets, model versions and aliases, evaluations, alerts, keys, feedback review,
privacy export/erasure, the audit log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from genloop.config import ServeConfig
from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, running_server, serve_config, wait_for_request_row


@pytest.fixture(scope="module")
def server(module_ws: Workspace) -> Iterator[LiveServer]:
    with running_server(module_ws, serve_config(), make_keys(module_ws)) as s:
        yield s


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(server.keys["admin"]) as c:
        yield c


def test_runs_with_their_metric_series(module_ws: Workspace, admin: httpx.Client) -> None:
    from genloop.train.tracking import RunTracker

    tracker = RunTracker.start(module_ws, name="tiny-train", kind="train", config={"lr": 0.1})
    for step in range(1, 51):
        tracker.log(step, loss=10.0 / step, lr=0.1)
    tracker.set_status("completed", summary={"loss": 0.2})
    runs = admin.get("/v1/admin/runs", params={"kind": "train"}).json()["data"]
    assert tracker.run_id in [r["id"] for r in runs]
    run = admin.get(f"/v1/admin/runs/{tracker.run_id}").json()
    assert run["status"] == "completed" and run["config"] == {"lr": 0.1}
    assert run["metrics"]["loss"][0] == [1, 10.0] and len(run["metrics"]["loss"]) == 50
    thin = admin.get(
        f"/v1/admin/runs/{tracker.run_id}", params={"keys": "loss", "max_points": 10}
    ).json()
    assert list(thin["metrics"]) == ["loss"] and len(thin["metrics"]["loss"]) == 10
    assert thin["metrics"]["loss"][-1] == [50, 0.2]
    timed = admin.get(
        f"/v1/admin/runs/{tracker.run_id}", params={"keys": "loss", "with_time": "true"}
    ).json()["metrics"]["loss"]
    assert [p[:2] for p in timed] == run["metrics"]["loss"]
    times = [p[2] for p in timed]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 600
    assert admin.get("/v1/admin/runs/nope").status_code == 404


def test_datasets_and_their_stored_records(module_ws: Workspace, admin: httpx.Client) -> None:
    from genloop.workspace.datasets import register_dataset_version

    def write(d: Path) -> None:
        (d / "card.md").write_text("# Dataset card: docs\n")
        (d / "samples.jsonl").write_text(
            "".join(f'{{"id": "{i}", "text": "t{i}"}}\n' for i in range(5))
        )

    register_dataset_version(module_ws, "docs", "a" * 64, write, stats={"documents": 5})
    listed = admin.get("/v1/admin/datasets").json()["data"]
    docs = next(d for d in listed if d["name"] == "docs")
    assert docs["latest"] == 1 and docs["versions"][0]["stats"] == {"documents": 5}
    one = admin.get("/v1/admin/datasets/docs/1").json()
    assert set(one["files"]) >= {"card.md", "samples.jsonl", "MANIFEST.sha256"}
    assert admin.get("/v1/admin/datasets/docs/1/card").json()["markdown"].startswith("# Dataset")
    samples = admin.get("/v1/admin/datasets/docs/1/samples", params={"limit": 3}).json()["data"]
    assert [s["id"] for s in samples] == ["0", "1", "2"]
    assert admin.get("/v1/admin/datasets/nope/1").status_code == 404


def test_models_promote_rollback_diff_and_history(admin: httpx.Client, server: LiveServer) -> None:
    versions = admin.get("/v1/admin/models", params={"name": "tiny"}).json()["data"]
    assert [v["ref"] for v in versions] == ["tiny@1", "tiny@2"]
    assert admin.get("/v1/admin/models/tiny/versions/2").json()["version"] == 2
    promoted = admin.post("/v1/admin/models/tiny/promote", json={"version": 2, "alias": "staging"})
    assert promoted.status_code == 200 and promoted.json()["aliases"] == ["staging"]
    admin.post("/v1/admin/models/tiny/promote", json={"version": 1, "alias": "staging"})
    back = admin.post("/v1/admin/models/tiny/rollback", json={"alias": "staging"})
    assert back.json()["version"] == 2
    history = admin.get("/v1/admin/models/tiny/aliases").json()["data"]
    staging = [h for h in history if h["alias"] == "staging"]
    assert [h["version"] for h in staging] == [1, 2] and staging[0]["rolled_back_at"]
    assert staging[0]["actor"].startswith("key:gl_")
    diff = admin.get("/v1/admin/models/diff", params={"a": "tiny@1", "b": "tiny@2"}).json()
    assert diff["a"] == "tiny@1" and diff["b"] == "tiny@2"
    missing = admin.post("/v1/admin/models/tiny/promote", json={"version": 9})
    assert missing.status_code == 404 and "no version 9" in missing.json()["error"]["message"]
    bad = admin.post("/v1/admin/models/tiny/promote", json={"version": 1, "alias": "1bad"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "alias"
    once = admin.post("/v1/admin/models/tiny/rollback", json={"alias": "production"})
    assert once.status_code == 409  # production has only ever pointed at one version
    audit = admin.get("/v1/admin/audit", params={"action": "promote"}).json()["data"]
    assert audit and audit[0]["target"] == "tiny@staging"


def test_evaluations_and_their_reports(module_ws: Workspace, admin: httpx.Client) -> None:
    from genloop.evaluate.results import SuiteResult
    from genloop.evaluate.store import save_evaluation
    from genloop.workspace import registry

    model = registry.resolve(module_ws, "tiny@1")
    record = save_evaluation(
        module_ws, model.id, None, [SuiteResult("perplexity", {"perplexity": 42.0})]
    )
    listed = admin.get("/v1/admin/evaluations", params={"model": "tiny@1"}).json()["data"]
    assert [e["id"] for e in listed] == [record.id]
    one = admin.get(f"/v1/admin/evaluations/{record.id}").json()
    assert one["metrics"]["perplexity"] == 42.0 and one["results"][0]["suite"] == "perplexity"
    report = admin.get(f"/v1/admin/evaluations/{record.id}/report").json()["markdown"]
    assert "perplexity" in report
    assert admin.get("/v1/admin/evaluations/99999/report").status_code == 404


def test_alerts_list_and_resolve(module_ws: Workspace, admin: httpx.Client) -> None:
    from genloop.monitor.alerts import raise_alert

    alert_id = raise_alert(module_ws, "drift", "PSI 0.4 > 0.2", {"psi": 0.4}, source="tiny@1")
    open_ = admin.get("/v1/admin/alerts", params={"unresolved": True}).json()["data"]
    assert alert_id in [a["id"] for a in open_]
    resolved = admin.post(f"/v1/admin/alerts/{alert_id}/resolve")
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["resolved_at"] is not None
    still = admin.get("/v1/admin/alerts", params={"unresolved": True}).json()["data"]
    assert alert_id not in [a["id"] for a in still]


def test_keys_created_listed_and_revoked(admin: httpx.Client, server: LiveServer) -> None:
    made = admin.post(
        "/v1/admin/keys", json={"name": "ci", "scopes": ["generate"], "expires_in": "1d"}
    )
    assert made.status_code == 200
    key = made.json()["key"]
    assert key.startswith("gl_") and made.json()["expires_at"]
    with server.client(key) as c:
        assert c.get("/v1/models").status_code == 200
        listed = admin.get("/v1/admin/keys").json()["data"]
        row = next(k for k in listed if k["id"] == made.json()["id"])
        assert "key" not in row and row["status"] == "active" and key not in str(listed)
        assert admin.delete(f"/v1/admin/keys/{row['id']}").json()["status"] == "revoked"
        assert c.get("/v1/models").status_code == 401
    bad = admin.post("/v1/admin/keys", json={"name": "x", "scopes": ["root"]})
    assert bad.status_code == 400
    assert (
        admin.post(
            "/v1/admin/keys", json={"name": "x", "scopes": ["generate"], "expires_in": "soon"}
        ).status_code
        == 422
    )


def test_feedback_review_queue(
    server: LiveServer, admin: httpx.Client, module_ws: Workspace
) -> None:
    with server.client(server.keys["client"]) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3})
        fb = c.post(
            "/v1/feedback", json={"response_id": r.json()["id"], "rating": 1, "comment": "nice"}
        )
    fid = fb.json()["id"]
    one = admin.get(f"/v1/admin/feedback/{fid}").json()
    assert one["comment"] == "nice" and one["prompt"] == "Hi"
    done = admin.post("/v1/admin/feedback/review", json={"ids": [fid], "decision": "approved"})
    assert done.json()["changed"] == [fid]
    listed = admin.get("/v1/admin/feedback", params={"status": "approved"}).json()
    assert fid in [f["id"] for f in listed["data"]] and listed["counts"]["approved"] >= 1


def test_privacy_export_then_erase(
    server: LiveServer, admin: httpx.Client, module_ws: Workspace
) -> None:
    with server.client(server.keys["client"]) as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "my secret question"}],
                "max_tokens": 3,
                "user": "carol@example.com",
            },
        )
    rid = r.json()["id"]
    wait_for_request_row(module_ws, rid)
    export = admin.post("/v1/admin/privacy/export", json={"user_id": "carol@example.com"}).json()
    assert [q["id"] for q in export["requests"]] == [rid]
    assert "my secret question" in export["requests"][0]["prompt"]
    erased = admin.post("/v1/admin/privacy/erase", json={"user_id": "carol@example.com"}).json()
    assert erased["erased"]["requests"] == 1
    again = admin.post("/v1/admin/privacy/export", json={"user_id": "carol@example.com"}).json()
    assert again["requests"] == [] and again["log_lines"] == []
    actions = [e["action"] for e in admin.get("/v1/admin/audit").json()["data"]]
    assert "privacy.erase" in actions and "privacy.export" in actions


def test_status_and_overview(admin: httpx.Client) -> None:
    status = admin.get("/v1/admin/status").json()
    assert status["ready"] and status["models"][0]["ref"] == "tiny@1"
    assert status["models"][0]["engine"]["max_batch_size"] == ServeConfig().max_batch_size
    overview = admin.get("/v1/admin/overview").json()
    assert overview["model_versions"] == 2 and overview["keys"] >= 4
