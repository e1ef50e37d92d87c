"""Right of access and right to erasure, proven with a canary: a unique string in one
user's prompts and feedback must be found nowhere (tables, decrypted values, files) once
that user is erased; other users' data stays."""

from __future__ import annotations

import json
import os
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from genloop.errors import ConflictError, NotFoundError
from genloop.security import crypto
from genloop.security.crypto import Cipher, DecryptionError, load_cipher
from genloop.security.keys import AuthError, create_key, verify_key
from genloop.security.privacy import erase_user, export_user, purge_expired, was_erased
from genloop.workspace import Workspace
from genloop.workspace.datasets import (
    check_trainable,
    get_dataset_version,
    register_dataset_version,
    resolve_dataset,
)
from genloop.workspace.tables import (
    ApiKey,
    AuditEvent,
    Base,
    Feedback,
    ModelVersion,
    RequestLog,
)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(crypto.ENV_SECRET_KEY, raising=False)


def _request(
    ws: Workspace, cipher: Cipher, rid: str, user: str, prompt: str, response: str, **kw: Any
) -> None:
    with ws.catalog.session() as s:
        s.add(
            RequestLog(
                id=rid,
                user_id=user,
                endpoint="completions",
                model_name="coder",
                model_version=1,
                prompt_enc=cipher.encrypt(prompt),
                response_enc=cipher.encrypt(response),
                params={"temperature": 0.7},
                prompt_tokens=5,
                completion_tokens=7,
                **kw,
            )
        )


def _feedback(
    ws: Workspace,
    cipher: Cipher,
    rid: str,
    user: str,
    *,
    rating: int = -1,
    correction: str | None = None,
    comment: str | None = None,
) -> int:
    with ws.catalog.session() as s:
        row = Feedback(
            request_id=rid,
            user_id=user,
            rating=rating,
            correction_enc=cipher.encrypt_optional(correction),
            comment_enc=cipher.encrypt_optional(comment),
        )
        s.add(row)
        s.flush()
        return row.id


def _log_line(ws: Workspace, entry: dict[str, Any], at: datetime | None = None) -> None:
    from genloop.monitor.logs import write_request_line

    write_request_line(ws.root, entry, at or datetime.now(UTC))


def _world(ws: Workspace, canary: str) -> dict[str, Any]:
    """Ann's requests and feedback carry the canary; Bob's do not. Logs, a feedback export
    (a dataset version), a set derived from it, a model trained on it, and keys."""
    from genloop.feedback.export import export_feedback
    from genloop.monitor.usage import user_hash

    cipher = load_cipher(ws)
    ann_key = create_key(ws.catalog, name="ann-app", scopes="generate", user_id="ann")
    _request(ws, cipher, "req-ann-1", "ann", f"my question {canary}", "an answer")
    _request(ws, cipher, "req-ann-2", "ann", "second question", f"echo {canary} back")
    _request(ws, cipher, "req-bob-1", "bob", "bob's own question", "bob's answer")
    _feedback(ws, cipher, "req-ann-1", "ann", correction=f"the right answer is {canary}")
    _feedback(ws, cipher, "req-ann-1", "bob", comment="agree, the answer was wrong")
    bob_fb = _feedback(ws, cipher, "req-bob-1", "bob", rating=1, comment="fine")
    for rid, user in (("req-ann-1", "ann"), ("req-ann-2", "ann"), ("req-bob-1", "bob")):
        _log_line(ws, {"request_id": rid, "user": user_hash(user, cipher), "model": "coder@1"})
    # a log line that names neither the user nor the request, only quotes the text
    (ws.root / "logs" / "app.jsonl").write_text(
        json.dumps({"event": "guardrail", "prompt": f"my question {canary}"})
        + "\n"
        + json.dumps({"event": "startup"})
        + "\n"
    )
    export = export_feedback(ws, cipher, "jsonl", name="coder-feedback")
    assert export.dataset is not None
    derived = register_dataset_version(
        ws,
        "retrain-mix",
        secrets.token_hex(8),
        lambda d: (d / "rows.jsonl").write_text(f'{{"text": "{canary}"}}\n'),
        lineage={"feedback_dataset_version_id": export.dataset.id},  # as retrain writes it
    )
    unrelated = register_dataset_version(
        ws, "stdlib", secrets.token_hex(8), lambda d: (d / "x.txt").write_text("print(1)\n")
    )
    with ws.catalog.session() as s:
        s.add(
            ModelVersion(
                name="coder",
                version=2,
                family="causal_lm",
                artifact="models/coder/2",
                dataset_version_id=derived.id,
            )
        )
    return {
        "cipher": cipher,
        "ann_key": ann_key.plaintext,
        "export": export.dataset,
        "derived": derived,
        "unrelated": unrelated,
        "bob_fb": bob_fb,
    }


def _hits_in_tables(ws: Workspace, cipher: Cipher, needle: str) -> list[str]:
    """Every table, every column, byte values decrypted where they can be."""
    hits = []
    with ws.catalog.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                for col, value in row._mapping.items():
                    if isinstance(value, bytes | memoryview):
                        raw = bytes(value)
                        try:
                            text = cipher.decrypt(raw)
                        except DecryptionError:
                            text = raw.decode("utf-8", "replace")
                    else:
                        text = json.dumps(value, default=str)
                    if needle in text:
                        hits.append(f"{table.name}.{col}")
    return hits


def _hits_in_files(root: Path, needle: str) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and needle.encode() in p.read_bytes()
    ]


def test_export_gives_a_user_everything_and_only_theirs(workspace: Workspace) -> None:
    canary = "CANARY-" + secrets.token_hex(8)
    world = _world(workspace, canary)
    data = export_user(workspace, "ann")
    assert [r["id"] for r in data["requests"]] == ["req-ann-1", "req-ann-2"]
    assert data["requests"][0]["prompt"] == f"my question {canary}"
    assert data["requests"][1]["response"] == f"echo {canary} back"
    assert [f["correction"] for f in data["feedback"]] == [f"the right answer is {canary}"]
    assert [k["name"] for k in data["api_keys"]] == ["ann-app"]
    assert world["ann_key"] not in json.dumps(data)
    refs = {v["ref"] for v in data["dataset_versions"]}
    assert refs == {world["export"].ref, world["derived"].ref}
    assert len(data["log_lines"]) == 2  # her two request-log lines, found by request id
    bob = export_user(workspace, "bob")
    assert canary not in json.dumps([bob["requests"], bob["feedback"]])
    with workspace.catalog.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "privacy.export")).first()
    assert event is not None and "ann" not in event.target + json.dumps(event.details)


def test_erasure_leaves_no_trace_of_the_canary(catalog_workspace: Workspace) -> None:
    ws = catalog_workspace
    canary = "CANARY-" + secrets.token_hex(8)
    world = _world(ws, canary)
    cipher: Cipher = world["cipher"]
    assert _hits_in_tables(ws, cipher, canary)  # the canary is there to begin with
    assert _hits_in_files(ws.root, canary)
    log_modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (ws.root / "logs").iterdir()}

    counts = erase_user(ws, "ann", "admin:test")

    assert counts["requests"] == 2
    assert counts["feedback"] == 1 and counts["feedback_on_user_requests"] == 1
    assert counts["dataset_versions_excluded"] == 2  # the export and the set made from it
    assert counts["artifacts_deleted"] == 2
    assert counts["model_versions_flagged"] == 1
    assert counts["api_keys_revoked"] == 1
    assert counts["log_lines"] == 3 and counts["log_files"] == 2
    assert _hits_in_tables(ws, cipher, canary) == []
    assert _hits_in_files(ws.root, canary) == []
    assert _hits_in_tables(ws, cipher, '"ann"') == []  # the user id itself is gone too
    for path, mode in log_modes.items():
        assert stat.S_IMODE(path.stat().st_mode) == mode

    # Bob's data stays, and his feedback is free for the next export
    with ws.catalog.session() as s:
        assert list(s.scalars(select(RequestLog.id))) == ["req-bob-1"]
        bob_fb = s.get(Feedback, world["bob_fb"])
        assert bob_fb is not None and bob_fb.exported_to is None
        tags = s.scalars(select(ModelVersion.tags)).one()
    assert tags["trained_on_excluded_data"] is True
    assert sum(1 for line in (ws.root / "logs" / "app.jsonl").open()) == 1
    # the sets built from her data are never trained on again
    for info in (world["export"], world["derived"]):
        version = get_dataset_version(ws, info.id)
        assert version.status == "excluded"
        assert not ws.store.exists(version.artifact)
        with pytest.raises(ConflictError, match="excluded after a privacy erasure"):
            check_trainable(version)
    with pytest.raises(NotFoundError, match="every version of dataset coder-feedback"):
        resolve_dataset(ws, "coder-feedback")
    assert resolve_dataset(ws, "stdlib").status == "ready"
    assert ws.store.exists(world["unrelated"].artifact)
    # her key no longer works; the audit log says an erasure happened, not whose
    with pytest.raises(AuthError):
        verify_key(ws.catalog, world["ann_key"])
    with ws.catalog.session() as s:
        assert s.scalars(select(ApiKey.user_id)).one() is None
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "privacy.erase")).one()
    assert event.actor == "admin:test" and event.details["requests"] == 2
    assert "ann" not in event.target and event.target.startswith("user:u_")
    assert len(was_erased(ws, "ann")) == 1 and was_erased(ws, "bob") == []

    again = erase_user(ws, "ann", "admin:test")  # nothing left to find
    assert sum(again.values()) == 0


def test_erasure_reaches_lines_written_by_the_request_log(workspace: Workspace) -> None:
    """Lines found by the request log's user pseudonym alone, in a file of mode 0600: the
    keyed one, and the unkeyed hash that versions before keyed pseudonyms wrote."""
    import hashlib

    from genloop.monitor.usage import user_hash

    cipher = load_cipher(workspace)
    legacy = "u_" + hashlib.sha256(b"cy").hexdigest()[:16]
    _log_line(workspace, {"request_id": "gone-from-db", "user": user_hash("cy", cipher)})
    _log_line(workspace, {"request_id": "older-line", "user": legacy})
    _log_line(workspace, {"request_id": "other", "user": user_hash("dee", cipher)})
    path = next((workspace.root / "logs").glob("requests-*.jsonl"))
    counts = erase_user(workspace, "cy", "admin")
    assert counts["log_lines"] == 2
    assert [json.loads(x)["request_id"] for x in path.read_text().splitlines()] == ["other"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_purge_removes_what_is_past_retention(workspace: Workspace) -> None:
    cipher = load_cipher(workspace)
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=40), now - timedelta(days=5)
    _request(workspace, cipher, "old", "ann", "old prompt", "x", created_at=old)
    _request(workspace, cipher, "new", "ann", "new prompt", "x", created_at=recent)
    _feedback(workspace, cipher, "new", "ann", comment="recent feedback")
    with workspace.catalog.session() as s:  # a feedback row older than the cutoff
        s.add(Feedback(request_id="new", user_id="bob", rating=1, created_at=old))
    _feedback(workspace, cipher, "old", "bob", comment="new feedback on an old request")
    _log_line(workspace, {"request_id": "old"}, at=old)
    _log_line(workspace, {"request_id": "new"}, at=recent)
    _log_line(workspace, {"request_id": "today"})

    counts = purge_expired(workspace, 30, actor="cron")

    assert counts == {"feedback": 2, "requests": 1, "log_files": 1}
    with workspace.catalog.session() as s:
        assert list(s.scalars(select(RequestLog.id))) == ["new"]
        assert s.scalar(select(Feedback.user_id)) == "ann"
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "privacy.purge")).one()
    assert event.actor == "cron" and event.details["requests"] == 1
    names = sorted(p.name for p in (workspace.root / "logs").iterdir())
    assert len(names) == 2 and f"requests-{old:%Y-%m-%d}.jsonl" not in names


def test_bad_arguments_are_refused(workspace: Workspace) -> None:
    from genloop.errors import ConfigError

    with pytest.raises(ConfigError, match="user id"):
        erase_user(workspace, "", "admin")
    with pytest.raises(ConfigError, match="at least 1"):
        purge_expired(workspace, 0)
    assert not os.path.exists(workspace.root / "logs")


def test_chat_turns_quoted_in_logs_go_and_the_shared_system_prompt_stays(
    workspace: Workspace,
) -> None:
    cipher = load_cipher(workspace)
    system = "You are a careful assistant for the whole team."
    canary = "CANARY-" + secrets.token_hex(8)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"please fix my code {canary}"},
    ]
    with workspace.catalog.session() as s:
        s.add(
            RequestLog(
                id="chat-1",
                user_id="ann",
                endpoint="chat.completions",
                model_name="m",
                prompt_enc=cipher.encrypt(json.dumps(messages)),
            )
        )
    logs = workspace.root / "logs"
    logs.mkdir()
    (logs / "guardrails.jsonl").write_text(
        json.dumps({"flag": "x", "text": f"please fix my code {canary}"})
        + "\n"
        + json.dumps({"flag": "y", "text": system})
        + "\n"
    )
    assert erase_user(workspace, "ann", "admin")["log_lines"] == 1
    assert _hits_in_files(workspace.root, canary) == []
    assert system in (logs / "guardrails.jsonl").read_text()
