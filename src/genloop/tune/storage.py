"""Where a study lives and how its workers coordinate: Optuna's storage, trial heartbeats
and the study's lock.

Optuna keeps its tables in the catalog's database, apart from genloop's so the two
schema migrations never meet: PostgreSQL schema ``optuna`` (workers on other machines
share it), or for a SQLite catalog the file ``<catalog>.studies.db`` beside it (both
use a table named ``alembic_version``, which one SQLite file cannot hold twice).

A running trial's worker records a heartbeat every ``HEARTBEAT_S`` seconds; a worker that
dies without a word (SIGKILL, a lost machine) stops it, and the next claim fails its trial
(its run too) and queues the same values again. The study's lock is a catalog lease
(:mod:`genloop.workspace.leases`) that every worker on every machine shares.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConflictError, WorkspaceError
from genloop.workspace import leases, runs
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

OPTUNA_SCHEMA = "optuna"  # PostgreSQL schema holding Optuna's tables
HEARTBEAT_S = 10  # a running trial's worker says it is alive this often …
GRACE_S = 120  # … and its trial is failed (and queued again) after this long without
CLAIM_LEASE_S = 120.0  # the study lock while claiming a trial (a crashed holder frees it)
FINISH_LEASE_S = 1800.0  # … while registering the best model and writing the report


def open_storage(ws: Workspace, *, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """Optuna's storage for this workspace's catalog (see the module docstring for where); with
    ``heartbeat``, a running trial whose worker falls silent is failed and queued again."""
    import optuna
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = make_url(ws.catalog.url)
    engine_kwargs: dict[str, Any]
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise WorkspaceError("tuning needs a catalog in a file or in PostgreSQL")
        catalog = Path(url.database)
        studies = catalog.with_name(f"{catalog.stem}.studies.db")
        storage_url = f"sqlite:///{studies}"
        engine_kwargs = {"connect_args": {"timeout": 60, "check_same_thread": False}}
    elif url.get_backend_name() == "postgresql":
        with contextlib.suppress(Exception), ws.catalog.engine.begin() as conn:
            # two machines creating it at once: one of them loses the race, harmlessly
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
        storage_url = url.render_as_string(hide_password=False)
        engine_kwargs = {
            "connect_args": {"options": f"-c search_path={OPTUNA_SCHEMA}"},
            "pool_pre_ping": True,
        }
    else:
        raise WorkspaceError(
            f"tuning needs a SQLite or PostgreSQL catalog, not {url.get_backend_name()}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            storage_url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_S if heartbeat else None,
            grace_period=GRACE_S if heartbeat else None,
            heartbeat_stale_trial_callback=(
                functools.partial(_retry_stale, ws) if heartbeat else None
            ),
        )
    if url.get_backend_name() == "sqlite":  # readers never block the workers' writes
        with storage.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    return storage


def load_study(storage: optuna.storages.RDBStorage, name: str) -> optuna.Study | None:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def study_meta(study: optuna.Study, name: str) -> dict[str, Any]:
    meta = study.user_attrs.get("genloop")
    if not isinstance(meta, dict):
        raise ConflictError(f"study {name!r} exists but was not made by genloop tune")
    return meta


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat every HEARTBEAT_S seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next
                storage.record_heartbeat(trial._trial_id)

    thread = threading.Thread(target=beat, name=f"tune-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _retry_stale(ws: Workspace, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died (no heartbeat): its run failed, the trial queued again."""
    from genloop.train import checkpoint as ckpt

    log.warning("trial %d lost its worker (no heartbeat); it runs again", trial.number)
    run_id = trial.user_attrs.get("run_id")
    if run_id:
        runs.set_status(
            ws,
            run_id,
            "failed",
            error="its worker stopped without a word (no heartbeat)",
            only_if=lambda status: status == "running",
        )
        for _, key in ckpt.list_checkpoints(ws.store, run_id):
            ws.store.delete(key)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def study_lock(
    ws: Workspace, study: str, *, lease_s: float
) -> contextlib.AbstractContextManager[None]:
    """The study's lock (a lease on ``tune:STUDY``), shared by every worker on every
    machine; a holder that dies frees it when its lease runs out."""
    return leases.wait_for(
        ws,
        leases.lease_name("tune", study),
        lease_s=lease_s,
        wait_s=FINISH_LEASE_S,
        busy=f"study {study!r} stays locked by another worker; if none is running, "
        "wait for its lease to run out",
    )
