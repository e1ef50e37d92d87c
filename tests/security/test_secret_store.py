"""The workspace's encrypted secret store (upstream keys): values sealed at rest, the file
private, names only in lists and the audit log, and still readable after a key rotation."""

from __future__ import annotations

import io
import json
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from genloop.errors import ConfigError, NotFoundError
from genloop.security import crypto
from genloop.security.secret_store import (
    delete_secret,
    get_secret,
    list_secrets,
    set_secret,
    store_file,
)
from genloop.workspace import Workspace, init_workspace

VALUE = "sk-upstream-0123456789abcdef"


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    monkeypatch.delenv(crypto.ENV_SECRET_KEY, raising=False)
    w = init_workspace(tmp_path / "ws")
    yield w
    w.close()


def test_set_get_list_delete_and_nothing_in_clear(ws: Workspace) -> None:
    from genloop.workspace.audit import list_events

    assert set_secret(ws, "big-lm", VALUE + "\n") is False
    assert set_secret(ws, "big-lm", VALUE) is True  # replaced
    assert get_secret(ws, "big-lm") == VALUE
    assert list_secrets(ws) == ["big-lm"]
    path = store_file(ws)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert VALUE not in path.read_text() and "big-lm" in json.loads(path.read_text())
    events = list_events(ws, action="secret.set")
    assert events and VALUE not in json.dumps(events, default=str)
    delete_secret(ws, "big-lm")
    assert list_secrets(ws) == []
    with pytest.raises(NotFoundError, match="genloop secrets set big-lm"):
        get_secret(ws, "big-lm")


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [("bad name", "x", "not valid"), ("ok", "   ", "empty"), ("ok", "a\nb", "one line")],
)
def test_bad_names_and_values_are_refused(ws: Workspace, name: str, value: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        set_secret(ws, name, value)


def test_a_store_others_can_read_is_refused(ws: Workspace) -> None:
    set_secret(ws, "k", VALUE)
    store_file(ws).chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        get_secret(ws, "k")


def test_secrets_survive_a_key_rotation(ws: Workspace) -> None:
    set_secret(ws, "k", VALUE)
    before = store_file(ws).read_text()
    crypto.rotate_secret(ws)  # the old key is pruned: the secret must be resealed
    assert store_file(ws).read_text() != before
    assert get_secret(ws, "k") == VALUE


def test_the_cli_reads_the_value_from_stdin_and_never_prints_it(
    ws: Workspace, genloop_cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(VALUE + "\n"))
    made = genloop_cli(ws.root, "secrets", "set", "big-lm")
    assert made.returncode == 0 and "stored secret big-lm" in made.stdout
    shown = genloop_cli(ws.root, "secrets", "list", "--json")
    assert json.loads(shown.stdout) == ["big-lm"]
    assert all(VALUE not in r.stdout + r.stderr for r in (made, shown))
    assert get_secret(ws, "big-lm") == VALUE
    bad = genloop_cli(ws.root, "secrets", "rm", "nope")
    assert (
        bad.returncode != 0 and "no secret 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    )
    assert genloop_cli(ws.root, "secrets", "rm", "big-lm").returncode == 0
