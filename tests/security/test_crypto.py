"""Encryption at rest: AES-GCM values, the key file, the key ring and rotation."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from genloop.errors import ConfigError
from genloop.security import crypto
from genloop.security.crypto import (
    RELOAD_INTERVAL_S,
    Cipher,
    DecryptionError,
    _read_key_file,
    encode_key,
    key_file,
    load_cipher,
    new_key,
    rotate_secret,
)
from genloop.workspace import Workspace
from genloop.workspace.tables import AuditEvent, Feedback, RequestLog

TEXT = "Wie heißt die Hauptstadt? 東京 🚀 — prompt with\nnewlines"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(crypto.ENV_SECRET_KEY, raising=False)


def test_values_round_trip_and_hide_the_text(workspace: Workspace) -> None:
    cipher = load_cipher(workspace)
    a, b = cipher.encrypt(TEXT), cipher.encrypt(TEXT)
    assert a != b  # a fresh nonce each time
    assert TEXT.encode() not in a and b"Hauptstadt" not in a
    assert cipher.decrypt(a) == cipher.decrypt(b) == TEXT
    assert cipher.decrypt(memoryview(a)) == TEXT  # what PostgreSQL hands back
    assert cipher.decrypt(cipher.encrypt("")) == ""
    key_line = (workspace.root / "secret.key").read_text().splitlines()[-1]
    assert key_line not in repr(cipher)


def test_tampered_values_and_foreign_keys_are_refused(workspace: Workspace) -> None:
    cipher = load_cipher(workspace)
    blob = bytearray(cipher.encrypt(TEXT))
    blob[-1] ^= 1
    with pytest.raises(DecryptionError, match="tampered"):
        cipher.decrypt(bytes(blob))
    with pytest.raises(DecryptionError, match="bad header"):
        cipher.decrypt(b"plain text, not encrypted")
    other = Cipher([new_key()], "test")
    with pytest.raises(DecryptionError, match=f"key {cipher.primary_id}.*not in the key ring"):
        other.decrypt(cipher.encrypt(TEXT))


def test_the_key_file_is_made_once_with_mode_0600(workspace: Workspace) -> None:
    path = workspace.root / "secret.key"
    assert not path.exists()
    first = load_cipher(workspace)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_cipher(workspace)
    assert again.primary_id == first.primary_id
    assert again.decrypt(first.encrypt(TEXT)) == TEXT


def test_concurrent_first_use_makes_one_key(workspace: Workspace) -> None:
    ids: list[str] = []
    threads = [
        threading.Thread(target=lambda: ids.append(load_cipher(workspace).primary_id))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 8
    assert [p.name for p in workspace.root.iterdir() if "secret" in p.name] == ["secret.key"]


def test_a_key_file_others_can_read_is_refused(workspace: Workspace) -> None:
    load_cipher(workspace)
    path = workspace.root / "secret.key"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_cipher(workspace)


def test_the_environment_key_ring_wins(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = new_key(), new_key()
    monkeypatch.setenv(crypto.ENV_SECRET_KEY, encode_key(old))
    sealed_old = load_cipher(workspace).encrypt(TEXT)
    monkeypatch.setenv(crypto.ENV_SECRET_KEY, f"{encode_key(new)}, {new.hex()}, {old.hex()}")
    ring = load_cipher(workspace)
    assert ring.primary_id == crypto.key_id(new).hex()
    assert ring.decrypt(sealed_old) == TEXT
    assert not (workspace.root / "secret.key").exists()
    for bad in ("short", "x" * 44, encode_key(b"\x00" * 16)):
        monkeypatch.setenv(crypto.ENV_SECRET_KEY, bad)
        with pytest.raises(ConfigError, match=r"GENLOOP_SECRET_KEY.*32 bytes"):
            load_cipher(workspace)


def _seed(ws: Workspace, cipher: Cipher, n: int) -> None:
    with ws.catalog.session() as s:
        for i in range(n):
            s.add(
                RequestLog(
                    id=f"req-{i:03d}",
                    endpoint="completions",
                    model_name="m",
                    user_id="ann",
                    prompt_enc=cipher.encrypt(f"prompt {i}"),
                    response_enc=cipher.encrypt(f"response {i}") if i % 2 else None,
                )
            )
        s.flush()
        for i in range(n):
            s.add(
                Feedback(
                    request_id=f"req-{i:03d}",
                    user_id="ann",
                    rating=1,
                    correction_enc=cipher.encrypt(f"correction {i}"),
                    comment_enc=None,
                )
            )


def _texts(ws: Workspace, cipher: Cipher) -> list[str | None]:
    out: list[str | None] = []
    with ws.catalog.session() as s:
        for r in s.scalars(select(RequestLog).order_by(RequestLog.id)):
            out += [cipher.decrypt_optional(r.prompt_enc), cipher.decrypt_optional(r.response_enc)]
        for f in s.scalars(select(Feedback).order_by(Feedback.id)):
            out += [
                cipher.decrypt_optional(f.correction_enc),
                cipher.decrypt_optional(f.comment_enc),
            ]
    return out


def test_rotation_reencrypts_every_row_and_retires_the_old_key(
    catalog_workspace: Workspace,
) -> None:
    ws = catalog_workspace
    running = load_cipher(ws)  # a server's, loaded before the rotation
    copy = Cipher(_read_key_file(key_file(ws)), "a copy of the old key file")
    old_id = running.primary_id
    _seed(ws, running, 7)
    before = _texts(ws, running)

    result = rotate_secret(ws, batch_size=3)  # several batches
    new = load_cipher(ws)
    assert result.key_id == new.primary_id != old_id
    assert result.reencrypted == 14 and result.unreadable == 0
    assert result.pruned == [old_id]
    assert new.key_ids == [new.primary_id]  # the old key is gone from the file
    assert _texts(ws, new) == before
    with pytest.raises(DecryptionError):
        _texts(ws, copy)
    # the running process took the new ring by itself: no restart
    assert running.primary_id == new.primary_id and _texts(ws, running) == before
    assert new.decrypt(running.encrypt("written after the rotation")) == (
        "written after the rotation"
    )
    with ws.catalog.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "secret.rotate")).one()
    assert event.details["reencrypted"] == 14
    assert rotate_secret(ws).reencrypted == 14  # again: a new key, every row again


def test_a_server_writing_during_rotation_loses_nothing(workspace: Workspace) -> None:
    """A process that keeps encrypting rows while ``rotate-secret`` runs (and prunes the
    old key): every row it wrote is readable with the new ring afterwards."""
    running = load_cipher(workspace)
    stop = threading.Event()
    written: list[str] = []

    def serve() -> None:
        while not stop.is_set():
            rid = f"live-{len(written):04d}"
            with workspace.catalog.session() as s:
                s.add(
                    RequestLog(
                        id=rid,
                        endpoint="completions",
                        model_name="m",
                        prompt_enc=running.encrypt(rid),
                    )
                )
            written.append(rid)
            time.sleep(0.02)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        time.sleep(0.2)
        rotate_secret(workspace)
    finally:
        stop.set()
        thread.join()
    new = load_cipher(workspace)
    assert len(new.key_ids) == 1 and len(written) > 20
    with workspace.catalog.session() as s:
        rows = {r.id: new.decrypt(r.prompt_enc) for r in s.scalars(select(RequestLog))}
    assert rows == {rid: rid for rid in written}


def test_a_broken_key_file_keeps_the_ring_loaded(
    workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    running = load_cipher(workspace)
    blob = running.encrypt("kept")
    path = key_file(workspace)
    path.write_text("not a key\n")
    time.sleep(RELOAD_INTERVAL_S + 0.1)
    with caplog.at_level(logging.WARNING, logger="genloop"):
        assert running.decrypt(blob) == "kept"
    assert any("kept the old key ring" in r.getMessage() for r in caplog.records)


def test_rotation_can_keep_the_old_key(workspace: Workspace) -> None:
    old = load_cipher(workspace)
    old_id = old.primary_id
    _seed(workspace, old, 2)
    rotate_secret(workspace, prune=False)
    ring = load_cipher(workspace)
    assert ring.key_ids[1:] == [old_id]
    assert rotate_secret(workspace, prune=False).reencrypted == 4


def test_rotation_with_the_environment_key_ring(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = new_key(), new_key()
    monkeypatch.setenv(crypto.ENV_SECRET_KEY, encode_key(old))
    _seed(workspace, load_cipher(workspace), 3)
    monkeypatch.setenv(crypto.ENV_SECRET_KEY, f"{encode_key(new)},{encode_key(old)}")
    result = rotate_secret(workspace)
    assert result.reencrypted == 6 and result.pruned == []
    assert rotate_secret(workspace).reencrypted == 0  # everything is under NEW already
    monkeypatch.setenv(crypto.ENV_SECRET_KEY, encode_key(new))  # OLD dropped
    assert _texts(workspace, load_cipher(workspace))[:2] == ["prompt 0", None]


def test_rows_sealed_with_a_lost_key_are_counted_and_left_alone(workspace: Workspace) -> None:
    lost = Cipher([new_key()], "lost")
    _seed(workspace, lost, 2)
    result = rotate_secret(workspace)
    assert result.unreadable == 4 and result.reencrypted == 0
    assert _texts(workspace, lost)[0] == "prompt 0"


def test_the_key_file_has_no_other_copies(workspace: Workspace, tmp_path: Path) -> None:
    load_cipher(workspace)
    rotate_secret(workspace)
    leftovers = [p.name for p in workspace.root.iterdir() if p.name.startswith(".")]
    assert leftovers == []
