"""Run untrusted Python (generated code and its tests) in a sandbox.

:func:`run_python` writes the program into an empty temporary directory and starts a
launcher (``_launcher.py``, run as a script by a fresh ``python -I -S -B`` with a cleared
environment, in a new session: its own process group). The launcher sets up the boundary
and forks the process that runs the program; it waits for it, sweeps up anything the
program left behind and reports the wait status on a pipe. This file is the host's half.

The boundary, and what each layer stops:

* **namespaces** (Linux; as root, or through a user namespace as a normal user where the
  kernel allows it): a new *network* namespace has no interfaces but a loopback that is
  down, so nothing is reachable, not even 127.0.0.1; a new *PID* namespace makes the
  program its PID 1, so when it ends (or is killed) the kernel kills every process it
  started, and it cannot see or signal the host's processes; new *IPC* and *UTS*
  namespaces; a new *mount* namespace in which every mount is remounted read-only except
  the working directory; ``/home``, ``/root``, ``/run/user``, the host's working
  directory and ``$GENLOOP_HOME`` (the workspace) are covered by empty read-only tmpfs
  mounts, and a fresh ``/proc`` shows only the sandbox's processes.
* **an unprivileged user**: as root, the program runs as a uid of its own
  (``_launcher.SANDBOX_UID_BASE`` + the launcher's PID, unique while it runs; ``nobody``
  where that uid is not mapped), with no supplementary groups, no capabilities and
  ``PR_SET_NO_NEW_PRIVS``. A uid of its own makes ``RLIMIT_NPROC`` count exactly the
  program's processes (it counts per uid, so under a shared uid concurrent runs would
  share one budget) and lets the launcher kill everything left with that uid
  (``kill(-1)`` as that uid) even without a PID namespace. As a normal user the program
  keeps your uid (and can read what you can read that no mount namespace hides).
* **resource limits** set in the program's process before it starts: CPU seconds
  (``RLIMIT_CPU``), address space (``RLIMIT_AS``, the memory limit), size of any file it
  writes (``RLIMIT_FSIZE``), processes and threads (``RLIMIT_NPROC``), open files
  (``RLIMIT_NOFILE``) and no core dumps.
* **a wall-clock timeout**: the host asks the launcher to kill the program, then kills the
  whole process group; output is captured through pipes and only the last
  ``output_bytes`` of each stream are kept.
* **an empty working directory** (``TMPDIR`` and ``HOME`` point there too), removed
  afterwards, and an **environment** of ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR`` only.
  The program's output goes nowhere but the result: the caller decides what to keep.
* **an audit hook** (:pep:`578`), installed just before the program runs, refuses
  sockets, ctypes, new processes and signals, and writes outside the working directory.
  It gives clear errors early, but code in the same interpreter can get around an audit
  hook (through ``dir_fd`` arguments, a path object that changes its mind, or corrupting
  memory), so it is a second layer only: **the operating-system layers above are the
  boundary.**

Which layers took effect is reported in :attr:`SandboxResult.layers`. Where the kernel or
the container refuses namespaces (a Docker container without ``CAP_SYS_ADMIN``, say), the
other layers still apply, ``layers`` shows what is missing, and the audit hook is then the
only thing between the program and the network: run untrusted code where ``netns``,
``pidns`` and ``fs-readonly`` appear. Without a mount namespace an unprivileged uid can
import only a standard library it may read (one under ``/root`` it may not). What stays
open even with every layer: reading world-readable files (read-only), the kernel's own
attack surface (no seccomp filter), and up to ``max_procs + 1`` processes using CPU until
the timeout. The program sees the standard library only (``-I -S``), not the packages
installed beside it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

from genloop.evaluate import _launcher
from genloop.evaluate._launcher import EXIT_LIMIT, SandboxViolation

__all__ = ["EXIT_LIMIT", "SandboxResult", "SandboxViolation", "Status", "run_python"]

Status = Literal["passed", "failed", "timeout", "error"]

OUTPUT_BYTES = 16_384
ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
TERM_GRACE_S = 2.0  # after the timeout, how long the launcher gets to clean up
HIDDEN = ("/home", "/root", "/run/user")


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed run ended.

    ``status``: ``passed`` (exit status 0), ``failed`` (the program ended with an error of
    its own: a failed assertion, an exception, a non-zero exit), ``timeout`` (wall-clock or
    CPU limit) or ``error`` (stopped by the sandbox: memory, file size or open-file limit, a
    refused operation, no network, a signal; or the sandbox itself failed). ``returncode``
    is the program's exit status (negative: the signal that killed it; None after a
    wall-clock timeout or when the sandbox failed). ``layers`` names the isolation layers
    that took effect (``netns``, ``pidns``, ``fs-readonly``, ``own-uid``, ``rlimits``, …).
    """

    status: Status
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    seconds: float
    layers: tuple[str, ...] = ()


def run_python(
    code: str,
    *,
    timeout_s: float,
    memory_mb: int,
    cpu_s: int | None = None,
    max_file_mb: int = 10,
    max_procs: int = 0,
    output_bytes: int = OUTPUT_BYTES,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in the sandbox and say how it ended.

    ``cpu_s`` defaults to ``timeout_s`` rounded up; ``max_procs`` counts the processes and
    threads the program may start besides itself (0: none); ``output_bytes`` is how much of
    the end of stdout and of stderr is kept; ``audit_hook=False`` leaves out the in-process
    guard, to check that the operating-system layers hold on their own.
    """
    import subprocess
    import tempfile

    if timeout_s <= 0 or memory_mb < 1 or max_file_mb < 0 or max_procs < 0 or output_bytes < 0:
        raise ValueError("timeout_s and memory_mb must be positive, the other limits ≥ 0")
    if not sys.executable:
        raise RuntimeError("no Python executable to start the sandbox with (sys.executable)")
    cpu = cpu_s if cpu_s is not None else max(1, math.ceil(timeout_s))
    outer = tempfile.mkdtemp(prefix="genloop-sandbox-", dir=_parent_dir(tempfile.gettempdir()))
    start = time.monotonic()
    try:
        # the unprivileged program must pass through to its directory; it cannot list or write
        os.chmod(outer, 0o711)  # noqa: S103
        work = os.path.join(outer, "work")
        os.mkdir(work, 0o700)
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        status_r, status_w = os.pipe()
        args = _launcher.launcher_args(
            outer=outer,
            work=work,
            status_fd=status_w,
            cpu_s=cpu,
            memory_bytes=memory_mb * 2**20,
            file_bytes=max_file_mb * 2**20,
            max_procs=max_procs,
            audit_hook=audit_hook,
            hide=[h for h in _hidden_dirs() if not _is_within(outer, h)],
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(_launcher.__file__), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=outer,
                env={"PATH": ENV_PATH, "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work},
                start_new_session=True,
                pass_fds=(status_w,),
            )
        finally:
            os.close(status_w)
        assert proc.stdout is not None and proc.stderr is not None
        out, err, status = bytearray(), bytearray(), bytearray()
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
        try:
            timed_out = _collect(proc.pid, streams, start + timeout_s, output_bytes)
        finally:
            _kill_group(proc.pid)  # stragglers; the launcher is unreaped, so its group id is ours
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            os.close(status_r)
        report = _launcher.parse_status(bytes(status))
        outcome, returncode = _classify(timed_out, report, cpu)
        stderr = err.decode("utf-8", "replace")
        if "setup_error" in report:
            stderr += f"\nsandbox: setup failed: {report['setup_error']}"
        return SandboxResult(
            status=outcome,
            returncode=returncode,
            stdout_tail=out.decode("utf-8", "replace"),
            stderr_tail=stderr,
            seconds=round(time.monotonic() - start, 3),
            layers=tuple(sorted(x for x in report["layers"].split(",") if x)),
        )
    finally:
        _remove_tree(outer)


def _collect(pid: int, streams: dict[int, bytearray], deadline: float, keep: int) -> bool:
    """Drain the pipes until they close; past ``deadline`` stop the launcher. True on timeout."""
    import selectors
    import signal

    sel = selectors.DefaultSelector()
    for fd in streams:
        sel.register(fd, selectors.EVENT_READ)
    timed_out = False
    give_up: float | None = None  # when to stop waiting for the pipes to close
    try:
        while sel.get_map():
            now = time.monotonic()
            if give_up is None:
                if _exited(pid):
                    give_up = now + 0.5  # something left behind may still hold the pipes
                elif now >= deadline:
                    timed_out = True
                    _signal(pid, signal.SIGTERM)  # the launcher kills the program, then reports
                    give_up = now + TERM_GRACE_S
            elif now >= give_up:
                break
            wake = give_up if give_up is not None else deadline
            for key, _ in sel.select(timeout=min(max(wake - now, 0.0), 0.1)):
                fd = int(key.fd)
                data = os.read(fd, 65536)
                if not data:
                    sel.unregister(fd)
                    continue
                buf = streams[fd]
                buf += data
                if len(buf) > keep:
                    del buf[: len(buf) - keep]
    finally:
        sel.close()
    return timed_out


def _exited(pid: int) -> bool:
    """Whether the launcher has ended, without reaping it (its PID keeps the group id ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _kill_group(pgid: int) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _classify(timed_out: bool, report: dict[str, str], cpu_s: int) -> tuple[Status, int | None]:
    import signal

    if timed_out:
        return "timeout", None
    if "setup_error" in report or not report.get("wait_status", "").lstrip("-").isdigit():
        return "error", None
    code = os.waitstatus_to_exitcode(int(report["wait_status"]))
    if code == 0:
        return "passed", 0
    if code < 0:
        # RLIMIT_CPU ends the program with SIGKILL (its soft and hard limits are equal); the
        # CPU time rusage reports is sampled, so it can fall a little short of the limit
        used = float(report.get("cpu_s") or 0.0)
        if -code in (signal.SIGKILL, signal.SIGXCPU) and used >= 0.9 * cpu_s - 0.05:
            return "timeout", code
        return "error", code
    return ("error" if code == EXIT_LIMIT else "failed"), code


def _parent_dir(tmp: str) -> str:
    """Where the sandbox's directory goes: ``tmp``, unless the program's unprivileged uid
    could not pass through it to its own directory (``TMPDIR=/root/tmp``, say)."""
    import stat

    if os.geteuid() != 0:
        return tmp  # the program keeps our uid
    path = os.path.realpath(tmp)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return "/tmp"  # noqa: S108 - mkdtemp makes a fresh, private directory in it
        if path == "/":
            return tmp
        path = os.path.dirname(path)


def _hidden_dirs() -> list[str]:
    """Home directories, and the host's working directory and ``$GENLOOP_HOME``: the
    workspace (catalog, datasets, logs) and the project usually live there, and files
    created with the default umask are world-readable, so the sandbox's uid could read
    them."""
    home = os.path.expanduser("~")
    workspace = os.environ.get("GENLOOP_HOME") or ""
    extra = [home, os.getcwd(), os.path.realpath(workspace) if workspace else ""]
    return list(dict.fromkeys([*HIDDEN, *(p for p in extra if p and p not in ("/", "~"))]))


def _is_within(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _remove_tree(path: str) -> None:
    """Remove the sandbox's directory, even where the program took its own permissions away."""
    import shutil

    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)
