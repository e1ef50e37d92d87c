"""Request records: the row, the hourly usage buckets, the JSON log lines, and no secrets."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from genloop.errors import GenloopError
from genloop.monitor.usage import (
    RequestRecord,
    RequestRecorder,
    parse_since,
    record_request,
    usage_summary,
)
from genloop.workspace import Workspace
from genloop.workspace.tables import ApiKey, RequestLog, Usage

API_KEY = "gl_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0"  # what a client sends
EMAIL = "jane.doe@example.com"
PHONE = "+1 415-555-0142"


def key_row(ws: Workspace, name: str = "ci") -> int:
    import hashlib

    with ws.catalog.session() as s:
        row = ApiKey(
            name=name,
            prefix=API_KEY[:8],
            key_hash=hashlib.sha256(API_KEY.encode()).hexdigest(),
            scopes="generate",
        )
        s.add(row)
        s.flush()
        return row.id


def record(**kw: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": f"cmpl-{uuid.uuid4().hex}",
        "endpoint": "chat.completions",
        "model_name": "tiny",
        "model_version": 1,
        "prompt": "hello",
        "response": "hi there",
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "latency_ms": 12.5,
    }
    return RequestRecord(**(base | kw))


def test_row_usage_and_log_line(workspace: Workspace, cipher: Any) -> None:
    key_id = key_row(workspace)
    entry = record_request(
        workspace,
        cipher,
        record(
            api_key_id=key_id,
            key_prefix=API_KEY[:8],
            user_id="user-42",
            params={"temperature": 0.7, "max_tokens": 16},
            flags=["pii_redacted"],
            finish_reason="stop",
            mean_logprob=-1.25,
        ),
        store_text=True,
    )
    with workspace.catalog.session() as s:
        row = s.scalars(select(RequestLog)).one()
        bucket = s.scalars(select(Usage)).one()
    assert row.id == entry["request_id"] and row.api_key_id == key_id
    assert row.model_name == "tiny" and row.model_version == 1 and row.status == 200
    assert row.prompt_enc is not None and cipher.decrypt(row.prompt_enc) == "hello"
    assert row.response_enc is not None and cipher.decrypt(row.response_enc) == "hi there"
    assert row.params["temperature"] == 0.7 and row.params["finish_reason"] == "stop"
    features = row.params["features"]
    assert features["prompt_len"] == 5 and features["output_len"] == 3
    assert features["logprob"] == -1.25 and features["refusal"] is False
    assert row.flags == ["pii_redacted"]
    assert (bucket.requests, bucket.prompt_tokens, bucket.completion_tokens) == (1, 5, 3)
    assert bucket.hour.minute == 0 and bucket.api_key_id == key_id

    [line] = (workspace.root / "logs").glob("requests-*.jsonl")
    assert line.name == f"requests-{datetime.now(UTC):%Y-%m-%d}.jsonl"
    logged = json.loads(line.read_text())
    assert logged == entry
    assert logged["model"] == "tiny@1" and logged["key_id"] == key_id
    assert logged["key_prefix"] == API_KEY[:8] and logged["latency_ms"] == 12.5
    assert logged["user"] == cipher.pseudonym("user-42") and "user-42" not in line.read_text()
    assert hashlib.sha256(b"user-42").hexdigest()[:16] not in line.read_text()  # keyed
    assert {"prompt", "response", "text"}.isdisjoint(logged)


def test_text_is_not_stored_when_off_and_never_in_the_clear(
    workspace: Workspace, cipher: Any
) -> None:
    record_request(workspace, cipher, record(), store_text=False)
    with workspace.catalog.session() as s:
        row = s.scalars(select(RequestLog)).one()
    assert row.prompt_enc is None and row.response_enc is None
    with pytest.raises(GenloopError, match="encryption key"):
        record_request(workspace, None, record(), store_text=True)


def test_logs_and_catalog_hold_no_key_and_no_planted_pii(
    workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    """Plant a key, an email and a phone number everywhere a client can put text; then
    grep every log file, the logger output and the raw database files for them. With the
    server's real cipher and guardrails."""
    from genloop.config import GuardrailsConfig
    from genloop.security.crypto import load_cipher
    from genloop.security.guardrails import Guardrails

    cipher, guardrails = load_cipher(workspace), Guardrails(GuardrailsConfig())
    planted = f"Mail {EMAIL} or call {PHONE}; my key is {API_KEY}"
    with caplog.at_level(logging.DEBUG, logger="genloop"):
        for i in range(3):
            record_request(
                workspace,
                cipher,
                record(
                    prompt=planted,
                    response=f"Sure, I will mail {EMAIL} and call {PHONE}.",
                    key_prefix=API_KEY[:8],
                    user_id=f"user-{i}",
                    params={
                        "stop": [EMAIL],
                        "user": planted,
                        "api_key": API_KEY,
                        "metadata": {"note": f"call {PHONE}", "auth": f"Bearer {API_KEY}"},
                    },
                    flags=[f"pii:{EMAIL}"],
                ),
                store_text=True,
                guardrails=guardrails,
            )
    workspace.close()  # flush the SQLite WAL into the file

    texts = [p.read_bytes() for p in (workspace.root / "logs").iterdir()]
    texts += [p.read_bytes() for p in workspace.root.glob("catalog.db*")]
    texts.append(
        "\n".join(
            r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records
        ).encode()
    )
    assert len(texts) >= 3
    for blob in texts:
        for secret in (API_KEY, EMAIL, "555-0142", "jane.doe"):
            assert secret.encode() not in blob, secret
    # what was stored instead: placeholders
    ws = Workspace.open(workspace.root)
    try:
        with ws.catalog.session() as s:
            params = s.scalars(select(RequestLog.params)).first()
    finally:
        ws.close()
    assert params is not None
    assert params["stop"] == ["<EMAIL>"] and params["api_key"] == "<SECRET>"
    assert "<PHONE>" in params["metadata"]["note"] and "<SECRET>" in params["user"]


def test_keys_are_removed_even_when_pii_redaction_is_off(workspace: Workspace) -> None:
    from genloop.config import GuardrailsConfig
    from genloop.security.guardrails import Guardrails

    guardrails = Guardrails(GuardrailsConfig(redact_pii_in_logs=False))
    record_request(
        workspace,
        None,
        record(params={"note": f"{EMAIL} {API_KEY}"}),
        store_text=False,
        guardrails=guardrails,
    )
    with workspace.catalog.session() as s:
        params = s.scalars(select(RequestLog.params)).one()
    assert params["note"] == f"{EMAIL} <SECRET>"  # the operator's choice for PII; never keys


def test_usage_summary_per_key_and_model(workspace: Workspace) -> None:
    key_id = key_row(workspace)
    old = datetime.now(UTC) - timedelta(days=10)
    for _ in range(3):
        record_request(workspace, None, record(api_key_id=key_id), store_text=False)
    record_request(workspace, None, record(model_name="big", model_version=2), store_text=False)
    record_request(workspace, None, record(created_at=old), store_text=False)  # outside 7d
    rows = usage_summary(workspace, timedelta(days=7))
    assert rows == [
        {
            "key_id": key_id,
            "key_name": "ci",
            "key_prefix": API_KEY[:8],
            "model": "tiny",
            "requests": 3,
            "prompt_tokens": 15,
            "completion_tokens": 9,
            "total_tokens": 24,
        },
        {
            "key_id": None,
            "key_name": None,
            "key_prefix": None,
            "model": "big",
            "requests": 1,
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
        },
    ]
    by_model = usage_summary(workspace, timedelta(days=30), by=["model"])
    assert [(r["model"], r["requests"]) for r in by_model] == [("tiny", 4), ("big", 1)]
    with pytest.raises(GenloopError, match="grouped by key, model, version"):
        usage_summary(workspace, timedelta(days=1), by=["colour"])


def test_concurrent_writers_count_every_request(catalog_workspace: Workspace) -> None:
    """Threads on separate connections bump the same hourly bucket (SQLite and PostgreSQL)."""
    ws = catalog_workspace
    key_id = key_row(ws)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(15):
                record_request(ws, None, record(api_key_id=key_id), store_text=False)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with ws.catalog.session() as s:
        buckets = s.scalars(select(Usage).where(Usage.api_key_id == key_id)).all()
    assert len(buckets) == 1  # one row per bucket, even when the inserts raced
    assert buckets[0].requests == 60 and buckets[0].prompt_tokens == 300


def test_recorder_batches_from_many_threads_and_loses_only_bad_records(
    workspace: Workspace,
) -> None:
    recorded: list[str] = []
    recorder = RequestRecorder(
        workspace,
        None,
        store_text=False,
        flush_s=0.05,
        on_recorded=lambda r: recorded.append(r.request_id),
    )
    recorder.start()
    duplicate = record(request_id="cmpl-same")

    def client(i: int) -> None:
        for j in range(50):
            recorder.submit(record(request_id=f"cmpl-{i}-{j}"))
        recorder.submit(duplicate)  # three times the same id: two of them must fail

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.stop()
    assert recorder.failed == 2 and recorder.dropped == 0
    assert len(recorded) == 151 and recorded.count("cmpl-same") == 1
    with workspace.catalog.session() as s:
        assert len(s.scalars(select(RequestLog.id)).all()) == 151
        [bucket] = s.scalars(select(Usage)).all()
    assert bucket.requests == 151 and bucket.completion_tokens == 3 * 151
    lines = next((workspace.root / "logs").glob("*.jsonl")).read_text().splitlines()
    assert len(lines) == 151


def test_a_flushed_record_is_in_the_catalog(workspace: Workspace) -> None:
    """What feedback relies on: after aflush(), the request row it links to exists."""
    import asyncio

    recorder = RequestRecorder(workspace, None, store_text=False, flush_s=0.01)
    recorder.start()
    try:
        for i in range(20):
            recorder.submit(record(request_id=f"cmpl-{i}"))
            asyncio.run(recorder.aflush())
            with workspace.catalog.session() as s:
                assert s.get(RequestLog, f"cmpl-{i}") is not None
    finally:
        recorder.stop()


def test_recorder_holds_records_while_the_catalog_is_unreachable(workspace: Workspace) -> None:
    """A PostgreSQL restart loses no request rows: they wait, then are written first."""
    import socket

    from genloop.workspace.db import Catalog

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    down = Workspace(workspace.root, Catalog(f"postgresql://genloop@127.0.0.1:{port}/genloop"))
    recorder = RequestRecorder(down, None, store_text=False, max_batch=4)
    for i in range(10):
        recorder.submit(record(request_id=f"cmpl-{i}"))
    assert recorder.flush() == 0  # PostgreSQL is down: nothing written, nothing lost
    recorder.submit(record(request_id="cmpl-10"))
    assert recorder.flush() == 0
    assert recorder.failed == 0 and recorder.dropped == 0
    down.catalog.dispose()
    down.catalog = workspace.catalog  # the database is back
    assert recorder.flush() == 11
    with workspace.catalog.session() as s:
        ids = set(s.scalars(select(RequestLog.id)).all())
    assert ids == {f"cmpl-{i}" for i in range(11)}
    assert recorder.flush() == 0


def test_parse_since() -> None:
    assert parse_since("7d") == timedelta(days=7)
    assert parse_since("30m") == timedelta(minutes=30)
    assert parse_since("2w") == timedelta(weeks=2)
    for bad in ("", "7", "0d", "-1d", "1y", "999999w"):
        with pytest.raises(GenloopError, match="invalid duration"):
            parse_since(bad)


def test_cli_usage(workspace: Workspace) -> None:
    key_id = key_row(workspace)
    record_request(workspace, None, record(api_key_id=key_id), store_text=False)
    result = genloop("monitor", "usage", "--since", "1d", "--json", home=workspace.root)
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert row["requests"] == 1 and row["key_name"] == "ci" and row["model"] == "tiny"
    bad = genloop("monitor", "usage", "--since", "soon", home=workspace.root)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: invalid duration 'soon'")


_SCRIPT = Path(sys.executable).with_name("genloop")
GENLOOP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "genloop"]


def genloop(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_")}
    env |= {"GENLOOP_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [*GENLOOP, *args], env=env, cwd=home.parent, capture_output=True, text=True, timeout=120
    )


def test_rejected_records_are_bounded_bodyless_and_add_no_usage(
    catalog_workspace: Workspace,
) -> None:
    workspace = catalog_workspace  # SQLite and PostgreSQL
    # a flood of 401s: the queue keeps max_queue records and counts the rest as dropped
    recorder = RequestRecorder(
        workspace, None, store_text=False, max_queue=5, max_batch=2, max_per_flush=2
    )
    accepted = [
        recorder.submit(
            RequestRecord(
                request_id=f"rej-{i}",
                endpoint="/v1/models",
                model_name="",
                key_prefix="gl_AbCdEfGh",
                latency_ms=0.4,
                status=401,
                rejected=True,
                method="GET",
                reason="invalid_key",
            )
        )
        for i in range(20)
    ]
    assert accepted == [True] * 5 + [False] * 15 and recorder.dropped == 15
    # the writer thread writes at most max_per_flush a tick; a plain flush, everything
    assert recorder.flush(recorder.max_per_flush) == 2
    assert recorder.flush() == 3
    with workspace.catalog.session() as s:
        rows = list(s.scalars(select(RequestLog)))
        assert s.scalar(select(Usage.id)) is None  # refusals are not usage
    assert {(r.endpoint, r.status, r.model_name) for r in rows} == {("/v1/models", 401, "")}
    assert rows[0].params == {
        "rejected": True,
        "method": "GET",
        "reason": "invalid_key",
        "key_prefix": "gl_AbCdEfGh",
    }
    assert rows[0].prompt_enc is None and rows[0].response_enc is None
    (log_file,) = (workspace.root / "logs").glob("requests-*.jsonl")
    line = json.loads(log_file.read_text().splitlines()[0])
    assert line["rejected"] is True and line["reason"] == "invalid_key"
    assert line["endpoint"] == "/v1/models" and line["method"] == "GET"
