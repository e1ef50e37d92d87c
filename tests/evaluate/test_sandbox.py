"""The sandbox holds for real: each attack runs, is counted as a failure, and leaves the host
as it was. Most attacks run twice: with the audit hook, and without it, to show that the
operating-system layers hold on their own (those cases skip where the kernel or container
refuses the namespace they rely on; ``layers`` says which)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from genloop.evaluate.sandbox import TERM_GRACE_S, SandboxResult, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")

MEMORY_MB = 256
LAYERS = (
    run_python("pass", timeout_s=10, memory_mb=MEMORY_MB).layers
    if sys.platform.startswith("linux")
    else ()
)


def needs(layer: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not any(x.startswith(layer) for x in LAYERS),
        reason=f"this kernel or container gives the sandbox no {layer} (layers: {LAYERS})",
    )


@pytest.fixture
def marker(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh parent for the sandbox's directories; its path is in every launcher's
    command line, so it finds the processes of this test's runs (forks inherit it)."""
    root = tempfile.mkdtemp(prefix="genloop-sandbox-test-")
    os.chmod(root, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def sandbox_pids(marker: str) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.add(int(entry))
            except OSError:
                continue
    return pids


def run_watched(code: str, marker: str, **kwargs: object) -> tuple[SandboxResult, int]:
    """Run ``code`` and count, every few milliseconds, the processes it has running."""
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(sandbox_pids(marker)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_python(code, memory_mb=MEMORY_MB, **kwargs)  # type: ignore[arg-type]
    finally:
        done.set()
        watcher.join()
    return result, peak


def assert_nothing_left(marker: str) -> None:
    deadline = time.monotonic() + 2
    while sandbox_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel may still be tearing a namespace down
    assert sandbox_pids(marker) == set()
    assert os.listdir(marker) == []  # the working directory is gone too
    assert os.system("true") == 0  # the host can still start processes


# ---------------------------------------------------------------- ordinary outcomes


def test_a_program_that_succeeds_passes() -> None:
    result = run_python("print('hello', 6 * 7)", timeout_s=10, memory_mb=MEMORY_MB)
    assert result.status == "passed"
    assert result.returncode == 0
    assert result.stdout_tail == "hello 42\n"
    assert "rlimits" in result.layers


def test_the_working_directory_is_writable_and_empty() -> None:
    code = (
        "import os, tempfile\n"
        "assert os.listdir('.') == ['main.py'], os.listdir('.')\n"
        "open('data.txt', 'w').write('kept')\n"
        "assert open('data.txt').read() == 'kept'\n"
        "with tempfile.NamedTemporaryFile() as f: f.write(b'x')\n"
    )
    result = run_python(code, timeout_s=10, memory_mb=MEMORY_MB)
    assert result.status == "passed", result.stderr_tail


@pytest.mark.parametrize(
    ("code", "returncode"),
    [("assert 1 + 1 == 3", 1), ("raise SystemExit(3)", 3), ("def f(:\n", 1)],
)
def test_a_program_that_fails_fails(code: str, returncode: int) -> None:
    result = run_python(code, timeout_s=10, memory_mb=MEMORY_MB)
    assert result.status == "failed"
    assert result.returncode == returncode


@needs("netns")
def test_the_boundary_layers_are_in_place_here() -> None:
    for layer in ("netns", "pidns", "mntns", "fs-readonly", "proc", "no-new-privs"):
        assert layer in LAYERS
    if os.geteuid() == 0:
        assert "own-uid" in LAYERS or "nobody-uid" in LAYERS


# ---------------------------------------------------------------- time


def test_an_infinite_loop_times_out(marker: str) -> None:
    result = run_python("while True: pass", timeout_s=1, memory_mb=MEMORY_MB)
    assert result.status == "timeout"
    assert result.seconds < 1 + TERM_GRACE_S
    assert_nothing_left(marker)


def test_a_sleeping_program_times_out_on_the_wall_clock() -> None:
    result = run_python("import time; time.sleep(60)", timeout_s=1, memory_mb=MEMORY_MB)
    assert result.status == "timeout"
    assert result.seconds < 1 + TERM_GRACE_S


def test_the_cpu_limit_stops_a_busy_program_before_the_wall_clock() -> None:
    result = run_python("while True: pass", timeout_s=20, cpu_s=1, memory_mb=MEMORY_MB)
    assert result.status == "timeout"
    assert result.returncode is not None and result.returncode < 0  # killed by the kernel
    assert result.seconds < 10


# ---------------------------------------------------------------- processes

FORK_BOMB = """
import os
root = os.getpid()
started = 0
while True:
    try:
        if os.fork() == 0:
            continue  # every child bombs too
        if os.getpid() == root:
            started += 1
            print(started, flush=True)
    except OSError:
        pass
"""

SUBPROCESS_BOMB = """
import subprocess
children = []
while True:
    try:
        children.append(subprocess.Popen(["/bin/sh", "-c", "while :; do :; done # MARKER"]))
        print(len(children), flush=True)
    except OSError:
        pass
"""


@pytest.mark.parametrize("audit_hook", [True, False], ids=["audit", "os-only"])
@pytest.mark.parametrize("bomb", [FORK_BOMB, SUBPROCESS_BOMB], ids=["fork", "subprocess"])
def test_a_fork_bomb_is_stopped_and_cleaned_up(marker: str, bomb: str, audit_hook: bool) -> None:
    max_procs = 6
    code = bomb.replace("MARKER", marker)
    result, peak = run_watched(
        code, marker, timeout_s=1.5, max_procs=max_procs, audit_hook=audit_hook
    )
    assert result.status != "passed"
    # the launcher, the program and at most max_procs more
    assert peak <= max_procs + 2, (peak, result)
    started = [int(x) for x in result.stdout_tail.split()]
    assert max(started, default=0) <= max_procs
    if audit_hook:
        assert started == []  # refused before the first fork
    assert_nothing_left(marker)


@pytest.mark.parametrize("audit_hook", [True, False], ids=["audit", "os-only"])
def test_a_process_that_leaves_the_session_is_still_killed(marker: str, audit_hook: bool) -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "print('parent leaves')\n"
    )
    result = run_python(code, timeout_s=5, memory_mb=MEMORY_MB, max_procs=2, audit_hook=audit_hook)
    assert result.status == ("error" if audit_hook else "passed")
    assert_nothing_left(marker)


# ---------------------------------------------------------------- memory and files


@pytest.mark.parametrize("audit_hook", [True, False], ids=["audit", "os-only"])
@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10 * 2**30)", "chunks = []\nwhile True: chunks.append(bytearray(2**20))"],
    ids=["10GB-at-once", "growing"],
)
def test_a_memory_hog_is_stopped(marker: str, code: str, audit_hook: bool) -> None:
    result = run_python(code, timeout_s=10, memory_mb=MEMORY_MB, audit_hook=audit_hook)
    assert result.status == "error"
    assert "memory limit" in result.stderr_tail
    assert_nothing_left(marker)


def test_a_huge_file_is_stopped_at_the_file_size_limit() -> None:
    code = "open('big', 'wb').write(b'x' * (3 * 2**20))"
    result = run_python(code, timeout_s=10, memory_mb=MEMORY_MB, max_file_mb=1)
    assert result.status == "error"
    assert "File too large" in result.stderr_tail


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory anybody may write to, outside the sandbox."""
    path = tempfile.mkdtemp(prefix="genloop-escape-", dir="/tmp")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("audit_hook", [True, pytest.param(False, marks=needs("fs-readonly"))])
@pytest.mark.parametrize("how", ["open", "os.open", "parent"])
def test_a_write_outside_the_directory_is_refused(
    open_dir: str, how: str, audit_hook: bool, marker: str
) -> None:
    target = os.path.join(open_dir, "escape")
    code = {
        "open": f"open({target!r}, 'w').write('out')",
        "os.open": f"import os; os.open({target!r}, os.O_WRONLY | os.O_CREAT, 0o644)",
        "parent": "open('../escape', 'w').write('out')",
    }[how]
    result = run_python(code, timeout_s=10, memory_mb=MEMORY_MB, audit_hook=audit_hook)
    assert result.status == "error", result.stderr_tail
    assert os.listdir(open_dir) == []
    assert not any("escape" in name for _, _, names in os.walk(marker) for name in names)


def test_home_directories_are_hidden() -> None:
    if "home-hidden" not in LAYERS:
        pytest.skip(f"no mount namespace here (layers: {LAYERS})")
    code = "import os; print(os.listdir('/root'), os.listdir('/home'))"
    result = run_python(code, timeout_s=10, memory_mb=MEMORY_MB)
    assert result.stdout_tail == "[] []\n"


# ---------------------------------------------------------------- network and environment


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


@pytest.mark.parametrize("audit_hook", [True, pytest.param(False, marks=needs("netns"))])
@pytest.mark.parametrize("family", ["tcp", "udp"])
def test_the_network_is_unreachable(listener: socket.socket, audit_hook: bool, family: str) -> None:
    port = listener.getsockname()[1]
    code = {
        "tcp": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "udp": (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.sendto(b'hi', ('127.0.0.1', {port}))"
        ),
    }[family]
    result = run_python(code, timeout_s=10, memory_mb=MEMORY_MB, audit_hook=audit_hook)
    assert result.status == "error", result.stderr_tail
    expected = "not allowed in the sandbox" if audit_hook else "Network is unreachable"
    assert expected in result.stderr_tail
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected


def test_the_environment_is_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("GENLOOP_SANDBOX_CANARY", secret)
    code = (
        "import os\n"
        "print(sorted(os.environ))\n"
        "print(dict(os.environ))\n"
        f"try:\n    print(open('/proc/{os.getpid()}/environ').read())\n"
        "except OSError as e:\n    print('no host environ:', e.strerror)\n"
    )
    result = run_python(code, timeout_s=10, memory_mb=MEMORY_MB, audit_hook=False)
    assert result.status == "passed", result.stderr_tail
    assert secret not in result.stdout_tail
    assert result.stdout_tail.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"


def test_output_is_capped_to_its_tail() -> None:
    code = (
        "import sys\n"
        "for i in range(200_000):\n    print(f'line {i}')\n"
        "sys.stderr.write('e' * 100_000 + 'END')\n"
    )
    result = run_python(code, timeout_s=20, memory_mb=MEMORY_MB, output_bytes=1000)
    assert result.status == "passed"
    assert len(result.stdout_tail) == 1000
    assert result.stdout_tail.endswith("line 199999\n")
    assert len(result.stderr_tail) == 1000
    assert result.stderr_tail.endswith("eeeEND")


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0, memory_mb=MEMORY_MB)
