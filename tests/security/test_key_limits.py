"""Per-key limits: set with ``genloop keys create/set-limits``, stored on the key, read back
with it (and by servers, through the principal)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from genloop.errors import ConfigError
from genloop.security import crypto, keys
from genloop.security.ratelimit import Limits
from genloop.workspace import Workspace, audit, init_workspace

Cli = Callable[..., Any]


@pytest.fixture
def ws_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(crypto.ENV_SECRET_KEY, raising=False)
    keys.clear_cache()
    root = tmp_path / "ws"
    init_workspace(root).close()
    return root


def test_cli_creates_and_changes_a_keys_limits(ws_root: Path, genloop_cli: Cli) -> None:
    made = genloop_cli(
        ws_root,
        "keys", "create", "--name", "team-a", "--rpm", "30", "--tokens-per-day", "100000",
        "--tokens-per-month", "unlimited", "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.output
    data = json.loads(made.stdout)
    assert data["limits"] == {
        "requests_per_min": 30,
        "tokens_per_min": None,  # the server's default
        "tokens_per_day": 100_000,
        "tokens_per_month": 0,  # no limit for this key
    }
    # by name; 'default' gives a limit back to the server
    changed = genloop_cli(
        ws_root, "keys", "set-limits", "team-a", "--rpm", "default", "--tpm", "5000"
    )
    assert changed.returncode == 0, changed.output
    assert "tpm 5000, tokens/day 100000, tokens/month unlimited" in " ".join(changed.stdout.split())
    listed = json.loads(genloop_cli(ws_root, "keys", "list", "--json").stdout)
    assert listed[0]["limits"]["requests_per_min"] is None
    assert listed[0]["limits"]["tokens_per_min"] == 5000
    # what a server reads: the principal carries the overrides, merged over the defaults
    with Workspace.open(ws_root) as ws:
        principal = keys.verify_key(ws.catalog, data["key"])
        assert principal.limits == Limits(None, 5000, 100_000, 0)
        defaults = Limits(600, 100_000, 1_000_000, 10_000_000)
        assert defaults.overridden_by(principal.limits) == Limits(600, 5000, 100_000, None)
        events = [e["action"] for e in audit.list_events(ws)]
    assert "key.limits" in events


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("keys", "create", "--name", "x", "--rpm", "lots"), "invalid --rpm 'lots'"),
        (("keys", "set-limits", "nobody", "--rpm", "5"), "no API key with prefix 'nobody'"),
        (("keys", "set-limits", "1"), "give at least one limit"),
        (("keys", "create", "--name", "x", "--tpm", "99999999999"), "tokens_per_min must be"),
    ],
)
def test_limit_mistakes_print_one_line(
    ws_root: Path, genloop_cli: Cli, args: tuple[str, ...], message: str
) -> None:
    genloop_cli(ws_root, "keys", "create", "--name", "first")
    result = genloop_cli(ws_root, *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.output


def test_a_name_shared_by_two_keys_needs_the_id(ws_root: Path) -> None:
    with Workspace.open(ws_root) as ws:
        for _ in range(2):
            keys.create_key(ws.catalog, name="twin", scopes="generate")
        with pytest.raises(ConfigError, match="2 keys are named 'twin'"):
            keys.set_key_limits(ws.catalog, "twin", {"tokens_per_day": 10})
        with pytest.raises(ConfigError, match="unknown limit"):
            keys.set_key_limits(ws.catalog, 1, {"tokens_per_year": 10})
        assert (
            keys.set_key_limits(ws.catalog, 2, {"tokens_per_day": 10}).limits.tokens_per_day == 10
        )
