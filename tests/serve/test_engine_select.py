"""``serve.engine``: which backend a model directory gets, and the errors when vLLM is missing.

These need no vLLM: they read config files only. The backend itself is tested against a
real vLLM process in ``test_vllm_engine.py``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from genloop.config import ServeConfig
from genloop.errors import GenloopError
from genloop.serve.engine.loader import select_backend
from genloop.serve.engine.vllm import INSTALL_COMMAND, VllmNotInstalled, require_vllm_python
from genloop.workspace import Workspace

from ..conftest import run_genloop
from .conftest import make_workspace

MISSING = Path("/nonexistent/genloop-vllm/bin/python")


def checkpoint(root: Path, model_type: str, family: str = "causal_lm") -> Path:
    """A model directory as far as backend selection reads it: its family and config."""
    root.mkdir(parents=True)
    (root / "genloop.json").write_text(json.dumps({"family": family}))
    (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    return root


def cfg(engine: str, python: Path | None = MISSING) -> ServeConfig:
    return ServeConfig.model_validate({"engine": engine, "vllm": {"python": python}})


def test_native_is_the_default() -> None:
    assert ServeConfig().engine == "native"


def test_auto_keeps_natively_batched_architectures_in_process(tmp_path: Path) -> None:
    llama = checkpoint(tmp_path / "llama", "llama")
    assert select_backend(llama, model_name="m", cfg=cfg("auto", Path(sys.executable))) == "native"


def test_auto_sends_other_architectures_to_vllm_when_it_is_installed(tmp_path: Path) -> None:
    opt = checkpoint(tmp_path / "opt", "opt")  # a causal LM the native engine does not batch
    assert select_backend(opt, model_name="m", cfg=cfg("auto", Path(sys.executable))) == "vllm"
    gpt2 = checkpoint(tmp_path / "gpt2", "gpt2")  # batched natively: stays in process
    assert select_backend(gpt2, model_name="m", cfg=cfg("auto", Path(sys.executable))) == "native"
    t5 = checkpoint(tmp_path / "t5", "t5", family="seq2seq")  # vLLM runs no seq2seq model
    assert select_backend(t5, model_name="m", cfg=cfg("auto", Path(sys.executable))) == "native"


def test_auto_without_vllm_serves_natively_and_says_how_to_install_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    opt = checkpoint(tmp_path / "opt", "opt")
    with caplog.at_level(logging.WARNING, logger="genloop.serve.engine.loader"):
        assert select_backend(opt, model_name="m", cfg=cfg("auto")) == "native"
    assert INSTALL_COMMAND in caplog.text and "opt" in caplog.text


def test_vllm_without_its_environment_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpt2 = checkpoint(tmp_path / "gpt2", "gpt2")
    with pytest.raises(VllmNotInstalled, match=f"'{INSTALL_COMMAND}'"):
        select_backend(gpt2, model_name="m", cfg=cfg("vllm"))
    monkeypatch.setenv("GENLOOP_VLLM_PYTHON", str(MISSING))
    with pytest.raises(VllmNotInstalled, match="GENLOOP_VLLM_PYTHON"):
        require_vllm_python()


def test_vllm_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    t5 = checkpoint(tmp_path / "t5", "t5", family="seq2seq")
    with pytest.raises(GenloopError, match=r"serve\.engine native"):
        select_backend(t5, model_name="m", cfg=cfg("vllm", Path(sys.executable)))


def test_serve_cli_refuses_a_missing_vllm_environment_in_one_line(
    tmp_path: Path, model_dirs: tuple[Path, Path]
) -> None:
    ws: Workspace = make_workspace(tmp_path / "ws", model_dirs)
    ws.close()
    result = run_genloop(
        tmp_path / "ws",
        "serve",
        "-m",
        "tiny@production",
        "--set",
        "serve.engine=vllm",
        "--set",
        f"serve.vllm.python={MISSING}",
    )
    assert result.returncode != 0
    assert INSTALL_COMMAND in result.output and str(MISSING) in result.output
    assert "Traceback" not in result.output


def test_a_python_without_vllm_fails_to_start_cleanly(model_dirs: tuple[Path, Path]) -> None:
    """An environment without vLLM in it: start() says so and leaves no process behind."""
    import asyncio

    from genloop.serve.engine.loader import load_vllm_engine

    engine = load_vllm_engine(
        model_dirs[0], model_name="tiny", model_version=1, cfg=cfg("vllm", Path(sys.executable))
    )
    with pytest.raises(GenloopError, match="vLLM exited with status 1 while starting tiny@1"):
        asyncio.run(engine.start())
    assert engine.process.pid is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux parent-death signal")
def test_a_managed_engine_process_dies_with_a_killed_server(tmp_path: Path) -> None:
    """genloop killed without a drain (SIGKILL) leaves no engine process behind: the child
    vLLM would be is started as the server starts it, and the server is killed."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from genloop.serve.engine.vllm import dies_with_parent\n"
            "child = subprocess.Popen(dies_with_parent(sys.executable, "
            "[sys.executable, '-c', 'import time; time.sleep(120)']), start_new_session=True)\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(120)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the server never started its child"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        time.sleep(0.5)  # the guard has exec'd into the child's own command
        os.kill(child, 0)  # alive while the server is
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            # reaped by init once it exits; a zombie still answers kill(0) for a moment
            status = Path(f"/proc/{child}/stat")
            if status.exists() and status.read_text().split(") ")[1].startswith("Z"):
                break
            assert time.monotonic() < deadline, "the engine process outlived its server"
            time.sleep(0.05)
    finally:
        server.kill()
