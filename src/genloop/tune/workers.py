"""W tuning worker processes on one machine, and Ctrl-C across them.

Each worker opens its own workspace and runs :func:`genloop.tune.trial.run_worker` (claim a
trial, train it, record it, until the budget is reached); finished trials and errors come
back through a queue, and the calling process reports them. Workers fork from a fresh
server process (``forkserver``) that has imported torch, transformers' model modules and
the training loop once for all of them, so none pays that in its first trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from genloop.errors import GenloopError
from genloop.tune.trial import Plan, ProgressFn, run_worker, sigint_ignored
from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)


def run_workers(ws: Workspace, plan: Plan, n: int, progress: ProgressFn) -> None:
    import multiprocessing as mp

    # Never fork this process (it may hold torch threads, CUDA, database pools): workers
    # fork from a fresh server process that imported the heavy modules once for them all.
    if "forkserver" in mp.get_all_start_methods():
        ctx: Any = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_preload(plan.base["model"]["family"]))
    else:
        ctx = mp.get_context("spawn")
    events: Any = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)
    gpus = _visible_gpus() if plan.base["train"]["device"] != "cpu" else []
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(
                str(ws.root),
                ws.catalog.url,
                plan,
                i,
                threads,
                gpus[i % len(gpus)] if gpus else None,
                events,
            ),
            name=f"genloop-tune-{i}",
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    errors: list[str] = []
    interrupted = False

    def drain(timeout: float) -> bool:
        """Handle one event from the workers, if one comes within ``timeout`` seconds."""
        nonlocal interrupted
        try:
            kind, payload = events.get(timeout=timeout)
        except queue.Empty:
            return False
        if kind == "trial":
            progress(payload)
        elif kind == "interrupted":
            interrupted = True
        else:
            errors.append(payload)
        return True

    try:
        while any(p.is_alive() for p in procs):
            drain(0.2)
    except KeyboardInterrupt:
        with sigint_ignored():
            _stop_workers(procs, drain)
        for error in errors:  # what went wrong while they stopped
            log.warning("%s", error)
        raise
    finally:
        for p in procs:
            p.join()
    while drain(0.1):  # what the last ones said before leaving
        pass
    for p in procs:
        if p.exitcode not in (0, 130) and not errors:
            errors.append(f"tuning worker {p.name} ended with exit code {p.exitcode}")
    if errors:
        raise GenloopError(errors[0])
    if interrupted:
        raise KeyboardInterrupt


def _preload(family: str) -> list[str]:
    """Modules the worker processes import once, in the fork server, rather than each in
    its first trial (transformers' model modules alone take seconds). The server skips
    any that does not import."""
    modules = ["torch", "optuna", "genloop.train.loop", "genloop.train.objectives", __name__]
    return [*modules, f"genloop.models.{family}", *_FAMILY_MODULES.get(family, ())]


_FAMILY_MODULES = {
    "causal_lm": ("transformers.models.llama.modeling_llama",),
    "seq2seq": ("transformers.models.t5.modeling_t5",),
}


def _stop_workers(procs: list[Any], drain: Callable[[float], bool]) -> None:
    """Ctrl-C: the workers got it too (same process group); give them time to record their
    trials, pass it on to those that did not (a signal sent to this process only), and
    end the ones that still hang on."""
    deadline = time.monotonic() + 2.0
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        drain(0.1)
    for p in procs:
        if p.is_alive() and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGINT)
    deadline = time.monotonic() + 60.0
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        drain(0.1)
    for p in procs:
        if p.is_alive():
            p.terminate()


def _worker_main(
    root: str,
    database_url: str,
    plan: Plan,
    index: int,
    threads: int,
    gpu: str | None,
    events: Any,
) -> None:
    """One worker process: run trials, send back how each ended (and why it stopped)."""
    import sys

    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    signal.signal(signal.SIGINT, _first_ctrl_c)
    import torch

    torch.set_num_threads(threads)
    try:
        with Workspace.open(root, database_url=database_url) as ws:
            run_worker(ws, plan, index, lambda outcome: events.put(("trial", outcome)))
    except KeyboardInterrupt:
        events.put(("interrupted", None))
        sys.exit(130)
    except GenloopError as exc:
        events.put(("error", str(exc)))
        sys.exit(1)
    except BaseException:
        events.put(("error", f"tuning worker {index} crashed:\n{traceback.format_exc()}"))
        sys.exit(1)


def _first_ctrl_c(signum: int, frame: object) -> None:
    """A worker's Ctrl-C: stop, and ignore any other while the trial is recorded.

    A worker gets the terminal's Ctrl-C with its process group, and the parent passes one
    on to each worker still alive after a grace period (for a signal sent to the parent
    alone). On a busy machine both can reach the same worker: the second must not cut its
    bookkeeping short, however long that takes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _visible_gpus() -> list[str]:
    """CUDA devices to share out between workers (one per worker, round robin)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return [i.strip() for i in ids if i.strip()]
