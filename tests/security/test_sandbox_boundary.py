"""The code-evaluation sandbox seen from the secrets it must not reach: the workspace
(catalog, key file, logs), the encryption key in the environment, and the real services
on this machine (Redis, PostgreSQL)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from genloop.evaluate.sandbox import run_python
from genloop.security import crypto
from genloop.workspace import Workspace, init_workspace


def _layers() -> tuple[str, ...]:
    return run_python("pass", timeout_s=10, memory_mb=256).layers


@pytest.fixture
def open_workspace_dir() -> Iterator[Workspace]:
    """A workspace in a world-traversable folder, its catalog world-readable (the default
    umask): only the sandbox's hiding keeps the program out."""
    parent = Path(tempfile.mkdtemp(prefix="genloop-ws-", dir="/tmp"))
    parent.chmod(0o755)
    ws = init_workspace(parent / "ws")
    try:
        yield ws
    finally:
        ws.close()
        shutil.rmtree(parent, ignore_errors=True)


def test_the_workspace_and_the_secret_key_are_out_of_reach(
    open_workspace_dir: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = open_workspace_dir
    if "home-hidden" not in _layers():
        pytest.skip("no mount namespace here: the workspace cannot be hidden")
    (ws.root / "catalog.db").chmod(0o644)
    ws.root.chmod(0o755)
    code = f"""
import os
root = {str(ws.root)!r}
print(sorted(os.listdir(root)))
try:
    open(os.path.join(root, "catalog.db"), "rb").read()
    print("read the catalog")
except OSError as e:
    print(type(e).__name__)
print({crypto.ENV_SECRET_KEY!r} in os.environ)
"""
    monkeypatch.setenv(crypto.ENV_SECRET_KEY, crypto.encode_key(crypto.new_key()))
    monkeypatch.delenv("GENLOOP_HOME", raising=False)
    exposed = run_python(code, timeout_s=10, memory_mb=256)  # the control: reachable
    assert "read the catalog" in exposed.stdout_tail, exposed.stdout_tail + exposed.stderr_tail
    monkeypatch.setenv("GENLOOP_HOME", str(ws.root))
    result = run_python(code, timeout_s=10, memory_mb=256)
    assert result.status == "passed", result.stderr_tail
    assert result.stdout_tail.splitlines() == ["[]", "FileNotFoundError", "False"]


@pytest.mark.parametrize("port", [6379, 5432], ids=["redis", "postgres"])
def test_local_services_are_unreachable(port: int) -> None:
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
    for audit_hook in (True, False):  # the network namespace holds without the audit hook
        if not audit_hook and "netns" not in _layers():
            pytest.skip("no network namespace here")
        result = run_python(code, timeout_s=10, memory_mb=256, audit_hook=audit_hook)
        assert result.status == "error", result.stdout_tail + result.stderr_tail
