"""``genloop keys`` and ``genloop privacy`` as a user runs them: the key is printed once
and is found nowhere else, not in the catalog's files, not in the logs."""

from __future__ import annotations

import io
import json
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from genloop.security import crypto, keys
from genloop.security.keys import verify_key
from genloop.workspace import Workspace, init_workspace

Cli = Callable[..., Any]


@pytest.fixture
def ws_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(crypto.ENV_SECRET_KEY, raising=False)
    keys.clear_cache()
    root = tmp_path / "ws"
    init_workspace(root).close()
    return root


def _catalog_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.glob("catalog.db*")))


def test_the_key_is_printed_once_and_stored_nowhere(ws_root: Path, genloop_cli: Cli) -> None:
    common = ("--log-format", "json", "--log-level", "debug")
    made = genloop_cli(
        ws_root,
        *common,
        "keys",
        "create",
        "--name",
        "ci",
        "--scopes",
        "generate,feedback",
        "--expires",
        "30d",
        "--user",
        "ann",
    )
    assert made.returncode == 0, made.output
    key = made.stdout.strip()
    assert key.startswith("gl_") and made.stdout == key + "\n"  # stdout: the key alone
    assert "not shown again" in made.stderr and key not in made.stderr
    assert key[:11] in made.stderr

    listed = genloop_cli(ws_root, *common, "keys", "list", "--json")
    shown = json.loads(listed.stdout)
    assert [(k["name"], k["scopes"], k["user_id"], k["status"]) for k in shown] == [
        ("ci", ["generate", "feedback"], "ann", "active")
    ]
    with Workspace.open(ws_root) as ws:
        assert verify_key(ws.catalog, key).scopes == {"generate", "feedback"}
    revoked = genloop_cli(ws_root, *common, "keys", "revoke", key[:11])
    assert revoked.returncode == 0 and "revoked key 1" in revoked.stdout
    rotated = genloop_cli(ws_root, *common, "keys", "rotate-secret", "--json")
    assert rotated.returncode == 0 and json.loads(rotated.stdout)["reencrypted"] == 0

    outputs = [listed, revoked, rotated]
    for result in outputs:
        assert key not in result.output and key[3:] not in result.output
    catalog = _catalog_bytes(ws_root)
    assert key.encode() not in catalog and key[3:].encode() not in catalog
    for path in ws_root.rglob("*"):
        if path.is_file():
            assert key[3:].encode() not in path.read_bytes(), path


def test_json_create_prints_the_key_with_its_details(ws_root: Path, genloop_cli: Cli) -> None:
    made = genloop_cli(ws_root, "keys", "create", "--name", "ops", "--scopes", "admin", "--json")
    data = json.loads(made.stdout)
    assert data["key"].startswith("gl_") and data["scopes"] == ["admin"]
    assert data["expires_at"] is None and data["status"] == "active"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("keys", "create", "--name", "x", "--scopes", "root"), "unknown scope(s) root"),
        (("keys", "create", "--name", "x", "--expires", "soon"), "invalid duration 'soon'"),
        (("keys", "revoke", "42"), "no API key with id 42"),
    ],
)
def test_mistakes_print_one_line(
    ws_root: Path, genloop_cli: Cli, args: tuple[str, ...], message: str
) -> None:
    result = genloop_cli(ws_root, *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.output


def test_privacy_commands(ws_root: Path, genloop_cli: Cli, tmp_path: Path) -> None:
    from genloop.security.crypto import load_cipher
    from genloop.workspace.tables import RequestLog

    with Workspace.open(ws_root) as ws:
        cipher = load_cipher(ws)
        with ws.catalog.session() as s:
            s.add(
                RequestLog(
                    id="r1",
                    user_id="ann",
                    endpoint="completions",
                    model_name="m",
                    prompt_enc=cipher.encrypt("hello there"),
                )
            )
    out = tmp_path / "ann.json"
    exported = genloop_cli(ws_root, "privacy", "export", "--user", "ann", "--out", out)
    assert exported.returncode == 0, exported.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(out.read_text())["requests"][0]["prompt"] == "hello there"

    erased = genloop_cli(ws_root, "privacy", "erase", "--user", "ann", "--yes", "--json")
    assert json.loads(erased.stdout)["requests"] == 1
    again = genloop_cli(ws_root, "privacy", "export", "--user", "ann")
    assert json.loads(again.stdout)["requests"] == []
    purged = genloop_cli(ws_root, "privacy", "purge", "--days", "30", "--json")
    assert json.loads(purged.stdout) == {"feedback": 0, "requests": 0, "log_files": 0}


def test_erase_asks_first(ws_root: Path, genloop_cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    result = genloop_cli(ws_root, "privacy", "erase", "--user", "ann")
    assert result.returncode == 1 and "nothing erased" in result.stderr
