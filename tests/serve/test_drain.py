"""Graceful drain: on SIGTERM the server stops admitting, lets running requests finish
(or aborts them at ``serve.drain_timeout_s``) and exits.

The first test runs the real ``genloop serve`` command in a subprocess and signals it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from genloop.workspace import Workspace

from .conftest import auth, make_keys, running_server, serve_config


def read_stream(
    url: str, key: str, body: dict[str, Any], events: list[Any], first: threading.Event
) -> None:
    with (
        httpx.Client(base_url=url, headers=auth(key), timeout=60) as c,
        c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                first.set()


def test_sigterm_lets_running_requests_finish_then_exits(served_ws: Workspace) -> None:
    keys = make_keys(served_ws)
    env = os.environ | {"GENLOOP_HOME": str(served_ws.root)}
    cmd = [
        sys.executable, "-m", "genloop", "serve", "-m", "tiny@production", "--port", "0",
        "--set", "serve.drain_timeout_s=20", "--set", "serve.device=cpu",
        "--set", "security.guardrails.max_repetition=null",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, proc.stderr.read() if proc.stderr else "no output"
        deadline = time.monotonic() + 60
        while httpx.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        events: list[Any] = []
        first = threading.Event()
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 500, "temperature": 0}
        t = threading.Thread(target=read_stream, args=(url, keys["client"], body, events, first))
        t.start()
        assert first.wait(timeout=30)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert events[-1] == "[DONE]", events[-3:]
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "stopped" in out
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drain_aborts_what_is_still_running_at_the_deadline(served_ws: Workspace) -> None:
    from genloop.serve.app import begin_drain

    keys = make_keys(served_ws)
    cfg = serve_config(max_tokens=1000)
    with running_server(served_ws, cfg, keys) as s:
        events: list[Any] = []
        first = threading.Event()
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1000, "temperature": 0}
        t = threading.Thread(target=read_stream, args=(s.url, keys["client"], body, events, first))
        t.start()
        assert first.wait(timeout=30)
        loop = s.state.extras["loading"].get_loop()
        loop.call_soon_threadsafe(begin_drain, s.app, 0.2)
        t.join(timeout=30)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "aborted"
        assert sum(1 for e in events[:-2] if "choices" in e) < 1000
        with s.client(keys["client"]) as c:
            r = c.post("/v1/completions", json=body | {"max_tokens": 2})
            assert r.status_code == 503 and "retry-after" in r.headers
            assert c.get("/ready").status_code == 503
            assert c.get("/health").status_code == 200


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> tuple[int, str]:
    from genloop.cli.main import main

    monkeypatch.setattr(sys, "argv", ["genloop", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    code = exit_.value.code
    return int(code) if isinstance(code, int) else 1, capsys.readouterr().err


def test_serve_refuses_bad_invocations_with_one_line(
    tmp_path: Path, served_ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    home = ["-w", str(served_ws.root)]
    code, err = run_cli([*home, "serve"], monkeypatch, capsys)
    assert code == 2 and "nothing to serve" in err
    code, err = run_cli(
        [*home, "serve", "-m", "nope@production", "--port", "0"], monkeypatch, capsys
    )
    assert code == 1 and "no model named 'nope'" in err
    bad_tls = [*home, "serve", "-m", "tiny", "--ssl-certfile", str(tmp_path / "c.pem")]
    code, err = run_cli(bad_tls, monkeypatch, capsys)
    assert code == 2 and "ssl_certfile and ssl_keyfile go together" in err
    for e in (err,):
        assert "Traceback" not in e
