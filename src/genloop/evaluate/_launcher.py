"""The sandbox's launcher and the program's process: the half of ``sandbox.py`` that runs
inside the boundary. Read ``sandbox.py`` first; its docstring describes the layers.

``python -I -S -B _launcher.py ARGS`` (see :func:`launcher_args`) runs :func:`main` as
the user that started the sandbox: it enters new namespaces, makes the filesystem
read-only but for the working directory, forks the program's process (PID 1 of the new
PID namespace), waits for it and reports on the status pipe. The program's process mounts
its own ``/proc``, sets its resource limits, becomes the sandbox's uid, drops every
capability, installs the audit hook and runs ``main.py``.

This file is started once per run, so it imports only the modules the interpreter has
already loaded or that are small C modules (``_signal`` rather than ``signal``, which
imports ``enum``); ``ctypes`` is loaded only on Linux, where it is needed.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Sequence
    from typing import Protocol

    class _Libc(Protocol):
        """The few libc calls used here (the object is ctypes' CDLL)."""

        def unshare(self, flags: int, /) -> int: ...
        def mount(
            self, src: bytes | None, tgt: bytes, fs: bytes | None, flags: int, data: object, /
        ) -> int: ...
        def prctl(self, option: int, a: int, b: int, c: int, d: int, /) -> int: ...
        def capset(self, header: object, data: object, /) -> int: ...

else:
    import _signal as signal  # see the module docstring


EXIT_LIMIT = 86  # the program was stopped by a limit or a refused operation
SANDBOX_UID_BASE = 0x70000000  # above systemd's container uid ranges, below its foreign range
NOBODY = 65534
MAX_OPEN_FILES = 64
LIMIT_ERRNOS = {27, 24, 30, 101}  # EFBIG, EMFILE, EROFS, ENETUNREACH: the sandbox said no

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
_KEPT_MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


class SandboxViolation(PermissionError):
    """An operation the audit hook refuses."""


class Config:
    """The launcher's arguments, in the order :func:`launcher_args` writes them."""

    def __init__(self, argv: Sequence[str]) -> None:
        outer, work, status_fd, cpu_s, memory, file_bytes, procs, audit, *hide = argv
        self.outer = outer
        self.work = work
        self.status_fd = int(status_fd)
        self.cpu_s = int(cpu_s)
        self.memory_bytes = int(memory)
        self.file_bytes = int(file_bytes)
        self.max_procs = int(procs)
        self.audit_hook = audit == "1"
        self.hide = hide


def launcher_args(
    *,
    outer: str,
    work: str,
    status_fd: int,
    cpu_s: int,
    memory_bytes: int,
    file_bytes: int,
    max_procs: int,
    audit_hook: bool,
    hide: Sequence[str],
) -> list[str]:
    """The command-line arguments :class:`Config` reads."""
    numbers = (status_fd, cpu_s, memory_bytes, file_bytes, max_procs, int(audit_hook))
    return [outer, work, *map(str, numbers), *hide]


def parse_status(raw: bytes) -> dict[str, str]:
    """The ``key value`` lines written on the status pipe (``layers`` lines add up)."""
    report: dict[str, str] = {"layers": ""}
    for line in raw.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "layers":
            report["layers"] = ",".join(x for x in (report["layers"], value) if x)
        elif key:
            report[key] = value
    return report


def _write_status(fd: int, **items: object) -> None:
    lines = []
    for key, value in items.items():
        text = ",".join(value) if isinstance(value, list) else str(value)
        lines.append(f"{key} {' '.join(text.split())}\n")  # one line each
    os.write(fd, "".join(lines).encode())


# ---------------------------------------------------------------- the launcher


def main(argv: Sequence[str]) -> int:
    """Set up the boundary, fork the program, wait for it, sweep up, report."""
    import resource  # noqa: F401 - os.wait4 imports it, and /root may be hidden by then

    cfg = Config(argv)
    child: list[int] = []

    def stop(signum: int, frame: object) -> None:  # the host's timeout
        if child:
            try:  # noqa: SIM105 - contextlib would cost start-up time on every run
                os.kill(child[0], signal.SIGKILL)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    layers: list[str] = []
    try:
        libc = _libc()
        privileged = os.geteuid() == 0
        uid = _sandbox_uid(os.getpid()) if privileged else None
        nproc = _count_processes(os.getuid() if uid is None else uid) + 1 + cfg.max_procs
        namespaces = _enter_namespaces(libc, privileged) if libc is not None else set()
        layers += sorted(f"{name}ns" for name in namespaces)
        if uid is not None:
            for path in (cfg.work, os.path.join(cfg.work, "main.py")):
                os.chown(path, uid, uid)
        if libc is not None and "mnt" in namespaces:
            try:
                sys.path[:] = _lock_filesystem(libc, cfg, layers)
            except OSError as e:  # the other layers still hold; ``layers`` shows what is missing
                print(f"sandbox: the filesystem stays writable: {e}", file=sys.stderr)
        os.chdir(cfg.work)  # after the bind mount, so that this is the writable directory
        mount_proc = "pid" in namespaces and any(x.startswith("fs-readonly") for x in layers)
    except Exception as e:
        _write_status(cfg.status_fd, setup_error=f"{type(e).__name__}: {e}", layers=layers)
        raise
    pid = os.fork()
    if pid == 0:
        try:
            _program(cfg, libc, uid, nproc, mount_proc)
        finally:
            os._exit(EXIT_LIMIT)  # reached only when setting up the program's process failed
    child.append(pid)
    _, wait_status, usage = os.wait4(pid, 0)
    child.clear()
    if uid is not None and uid != NOBODY and "pid" not in namespaces:
        # (in a PID namespace the kernel has already killed them all, and refuses new forks)
        _sweep(uid)
    _write_status(
        cfg.status_fd,
        wait_status=wait_status,
        cpu_s=usage.ru_utime + usage.ru_stime,
        layers=layers,
    )
    return 0


def _enter_namespaces(libc: _Libc, privileged: bool) -> set[str]:
    """Unshare what this kernel and these privileges allow; the names of those entered."""
    entered: set[str] = set()
    if not privileged:
        uid, gid = os.geteuid(), os.getegid()
        if libc.unshare(CLONE_NEWUSER) != 0:
            return entered  # without a user namespace the others need CAP_SYS_ADMIN
        try:
            for name, text in (
                ("setgroups", "deny"),
                ("uid_map", f"{uid} {uid} 1"),
                ("gid_map", f"{gid} {gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError:
            return entered
        entered.add("user")
    for name, flag in (
        ("net", CLONE_NEWNET),
        ("pid", CLONE_NEWPID),
        ("mnt", CLONE_NEWNS),
        ("ipc", CLONE_NEWIPC),
        ("uts", CLONE_NEWUTS),
    ):
        if libc.unshare(flag) == 0:
            entered.add(name)
    return entered


def _lock_filesystem(libc: _Libc, cfg: Config, layers: list[str]) -> list[str]:
    """Make every mount read-only but the working directory; hide home directories.

    Returns ``sys.path`` for the program: the standard library's directories are bound
    under the sandbox's own directory first, so that they stay reachable for the
    unprivileged uid (an interpreter under ``/root/.pyenv``, say) and from under the
    hidden directories.
    """
    # first of all: no mount made here may propagate back to the host
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    paths: list[str] = []
    for i, entry in enumerate(sys.path):
        target = os.path.join(cfg.outer, f"lib{i}")
        if os.path.isdir(entry):
            os.mkdir(target, 0o755)
        elif os.path.isfile(entry):  # a zipped standard library
            open(target, "x").close()
        else:
            continue
        _mount(libc, entry, target, None, MS_BIND | MS_REC)
        _rebase_packages(entry, target)
        paths.append(target)
    failed = 0
    for mount_point, options in _mounts():
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= _KEPT_MOUNT_FLAGS.get(option, 0)
        if not flags & (MS_NOATIME | MS_RELATIME):
            flags |= MS_STRICTATIME
        try:
            _mount(libc, None, mount_point, None, flags)
        except OSError:
            failed += 1
    _mount(libc, cfg.work, cfg.work, None, MS_BIND)
    _mount(libc, None, cfg.work, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    layers.append("fs-readonly" if not failed else f"fs-readonly-except-{failed}-mounts")
    hidden = 0
    for path in cfg.hide:
        if os.path.isdir(path):
            try:
                flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
                _mount(libc, "none", path, "tmpfs", flags, b"size=4k,mode=755")
                hidden += 1
            except OSError:
                pass
    if hidden:
        layers.append("home-hidden")
    return paths


def _rebase_packages(old: str, new: str) -> None:
    """Point packages imported from ``old`` (``encodings``) at the same files under ``new``."""
    prefix = old.rstrip("/") + "/"
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):
            search[:] = [new + p[len(old) :] if p.startswith(prefix) else p for p in search]


def _mounts() -> list[tuple[str, list[str]]]:
    """(mount point, per-mount options) of every mount in this namespace."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            out.append((_unescape(fields[4]), fields[5].split(",")))
    return out


def _unescape(field: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` for a space, …)."""
    parts = field.split("\\")
    return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def _sandbox_uid(pid: int) -> int:
    """A uid for this run alone, or ``nobody`` where that uid is not mapped here."""
    uid = SANDBOX_UID_BASE + pid
    for name in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{name}") as f:
                ranges = [[int(x) for x in line.split()] for line in f if line.strip()]
        except OSError:
            return NOBODY
        if not any(start <= uid < start + count for start, _, count in ranges):
            return NOBODY
    return uid


def _count_processes(uid: int) -> int:
    """Processes whose real uid is ``uid`` (RLIMIT_NPROC counts them too)."""
    count = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            count += int(line.split()[1]) == uid
                            break
            except (OSError, ValueError, IndexError):
                continue
    return count


def _sweep(uid: int) -> None:
    """Kill every process still running as the run's own uid (``kill(-1)`` as that uid)."""
    import time

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setresuid(uid, uid, uid)
            for _ in range(100):
                os.kill(-1, signal.SIGKILL)  # every process we may signal, except ourselves
                time.sleep(0.001)
        except ProcessLookupError:
            pass  # none left
        except BaseException:
            code = 1
        os._exit(code)
    os.waitpid(pid, 0)


# ---------------------------------------------------------------- the program's process


def _program(cfg: Config, libc: _Libc | None, uid: int | None, nproc: int, proc: bool) -> None:
    """Finish the boundary, drop privileges, run ``main.py``; never returns normally."""
    import resource

    layers: list[str] = []
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if proc and libc is not None:  # this PID namespace's own /proc, without the host's
            _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
            layers.append("proc")
        for res, value in (
            (resource.RLIMIT_CPU, cfg.cpu_s),  # soft = hard: SIGKILL when spent
            (resource.RLIMIT_AS, cfg.memory_bytes),
            (resource.RLIMIT_FSIZE, cfg.file_bytes),
            (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, nproc),
        ):
            _, hard = resource.getrlimit(res)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(res, (value, value))
        layers.append("rlimits")
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            layers.append("nobody-uid" if uid == NOBODY else "own-uid")
        if libc is not None:
            _drop_capabilities(libc)
            _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
            _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change resets it
            layers.append("no-new-privs")
        if cfg.audit_hook:
            layers.append("audit-hook")
        with open("main.py", encoding="utf-8") as f:
            source = f.read()
    except Exception as e:
        _write_status(cfg.status_fd, setup_error=f"{type(e).__name__}: {e}", layers=layers)
        return
    _write_status(cfg.status_fd, layers=layers)
    os.close(cfg.status_fd)

    sys.argv[:] = ["main.py"]
    sys.dont_write_bytecode = True
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # so that importing ctypes again is an audited event
    if cfg.audit_hook:
        sys.addaudithook(_guard(os.path.realpath(".")))
    code = _run_main(source, os.path.abspath("main.py"))
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - contextlib would cost start-up time on every run
            stream.flush()
        except Exception:  # noqa: S110 - a broken pipe at exit changes nothing
            pass
    os._exit(code)


def _run_main(source: str, path: str) -> int:
    """Run the program as ``__main__``; its exit status (EXIT_LIMIT: the sandbox stopped it)."""
    import builtins

    main = type(sys)("__main__")
    main.__dict__.update(__file__=path, __builtins__=builtins)
    sys.modules["__main__"] = main
    try:
        # running untrusted code is the point: this is the sandboxed process
        exec(compile(source, path, "exec"), main.__dict__)  # noqa: S102
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ else None
        sys.excepthook(type(e), e.with_traceback(tb), tb)  # without this function's frame
        if isinstance(e, MemoryError):
            print("sandbox: memory limit reached", file=sys.stderr)
            return EXIT_LIMIT
        if isinstance(e, SandboxViolation) or (isinstance(e, OSError) and e.errno in LIMIT_ERRNOS):
            print("sandbox: operation refused", file=sys.stderr)
            return EXIT_LIMIT
        return 1
    return 0


def _guard(root: str) -> Callable[[str, tuple[object, ...]], None]:
    """The audit hook: a second layer (see ``sandbox.py``), not the boundary."""
    refused = (
        "socket.",
        "ctypes.",
        "subprocess.",
        "os.exec",
        "os.spawn",
        "os.posix_spawn",
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.kill",
        "os.killpg",
        "os.link",
        "os.symlink",
        "signal.pthread_kill",
        "pty.",
    )
    path_args = {
        "os.remove": (0,),
        "os.rename": (0, 1),
        "os.mkdir": (0,),
        "os.rmdir": (0,),
        "os.chmod": (0,),
        "os.chown": (0,),
        "os.truncate": (0,),
        "os.utime": (0,),
        "os.setxattr": (0,),
        "os.removexattr": (0,),
        "shutil.rmtree": (0,),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    allowed = {"/dev/null"}

    def inside(path: object) -> bool:
        if isinstance(path, int) or path is None:
            return True  # an open descriptor: checked when it was opened
        try:
            text = os.fsdecode(os.fspath(path))  # type: ignore[call-overload]
        except TypeError:
            return False
        full = os.path.normpath(os.path.join(os.getcwd(), text))
        return full == root or full.startswith(root + "/") or full in allowed

    def guard(event: str, args: tuple[object, ...]) -> None:
        if event.startswith(refused):
            raise SandboxViolation(f"{event} is not allowed in the sandbox")
        if event == "open":
            path, mode, flags = (*args, None, None, None)[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & write_flags)
            )
            if writes and not inside(path):
                raise SandboxViolation(f"writing {path!r} is not allowed in the sandbox")
        elif event in path_args:
            for i in path_args[event]:
                if i < len(args) and not inside(args[i]):
                    raise SandboxViolation(f"{event} on {args[i]!r} is not allowed in the sandbox")

    try:  # subprocess's C helper forks and execs without an audit event of its own
        import _posixsubprocess

        def no_fork_exec(*args: object) -> None:
            raise SandboxViolation("subprocesses are not allowed in the sandbox")

        _posixsubprocess.fork_exec = no_fork_exec  # type: ignore[assignment]
    except ImportError:
        pass
    return guard


# ---------------------------------------------------------------- the C library


def _libc() -> _Libc | None:
    """The C library, or None away from Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return libc


def _raise_errno(what: str) -> None:
    import ctypes

    errno = ctypes.get_errno()
    raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(
    libc: _Libc,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: bytes | None = None,
) -> None:
    src = source.encode() if source else None
    kind = fstype.encode() if fstype else None
    if libc.mount(src, target.encode(), kind, flags, data) != 0:
        _raise_errno(f"mount {target}")


def _prctl(libc: _Libc, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        _raise_errno(f"prctl({option})")


def _drop_capabilities(libc: _Libc) -> None:
    """Empty the effective, permitted and inheritable sets (capset, version 3)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
        _raise_errno("capset")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
