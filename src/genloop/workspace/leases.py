"""Named leases in the catalog (the ``locks`` table): one retrain of a model at a time, one
tuning worker claiming a study's next trial at a time.

A lease has an owner (``host:pid:random``) and an expiry. A holder that dies without
releasing it frees it when the expiry passes: the next worker takes it over (and knows it
did: ``taken_over``). Every worker shares the catalog, so this works across processes and
machines (PostgreSQL) as well as on one (SQLite). Two ways to hold one:

- :func:`hold`: take it now or fail (:class:`LeaseBusy`), renewed from a background thread
  while the block works; a holder whose lease was taken over meanwhile (it stalled past
  the expiry) finds ``lost`` set and must not publish anything;
- :func:`wait_for`: wait until it is free, hold it for a short block, no renewal.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from genloop.errors import ConflictError, GenloopError
from genloop.workspace.tables import Lock, utcnow
from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

MAX_KEY = 120  # longer keys are hashed: a lock's name holds 128 characters


class LeaseBusy(ConflictError):
    """Another live worker holds the lease."""


class LeaseLost(GenloopError):
    """The lease expired and another worker took it over while this one still worked."""


def lease_name(kind: str, key: str) -> str:
    """``kind:key``, with a key too long for the table replaced by its SHA-256."""
    if len(key) > MAX_KEY:
        key = hashlib.sha256(key.encode()).hexdigest()
    return f"{kind}:{key}"


def new_owner() -> str:
    """An owner id that names this process: ``host:pid:random``."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def acquire(ws: Workspace, name: str, owner: str, lease_s: float) -> bool:
    """Take the lease ``name`` for ``lease_s`` seconds; True when it took over an expired
    one (its previous holder stopped without releasing it). Raises :class:`LeaseBusy`."""
    now = utcnow()
    until = now + timedelta(seconds=lease_s)
    try:
        with ws.catalog.session(write_lock=True) as s:
            row = s.scalars(select(Lock).where(Lock.name == name).with_for_update()).first()
            if row is None:
                s.add(Lock(name=name, owner=owner, acquired_at=now, expires_at=until))
                return False
            if row.owner != owner and row.expires_at > now:
                raise LeaseBusy(
                    f"{name} is held by {row.owner} until "
                    f"{row.expires_at:%Y-%m-%d %H:%M:%S} UTC; try again later"
                )
            taken_over = row.owner != owner
            if taken_over:
                log.warning("lease %s of %s expired; taking it over", name, row.owner)
            row.owner, row.acquired_at, row.expires_at = owner, now, until
            return taken_over
    except DBIntegrityError:  # PostgreSQL: another worker inserted the row first
        raise LeaseBusy(f"{name} was just taken by another worker; try again later") from None


def renew(ws: Workspace, name: str, owner: str, lease_s: float) -> bool:
    """Push the expiry ``lease_s`` seconds on; False when the lease is no longer ours."""
    with ws.catalog.session() as s:
        result = s.execute(
            update(Lock)
            .where(Lock.name == name, Lock.owner == owner)
            .values(expires_at=utcnow() + timedelta(seconds=lease_s))
        )
        return bool(getattr(result, "rowcount", 0))


def release(ws: Workspace, name: str, owner: str) -> None:
    with ws.catalog.session() as s:
        s.execute(delete(Lock).where(Lock.name == name, Lock.owner == owner))


@dataclass
class Lease:
    name: str
    owner: str
    lease_s: float
    taken_over: bool
    lost: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another worker took the lease over."""
        if self.lost.is_set():
            raise LeaseLost(
                f"lease {self.name} expired while this worker held it (stalled longer than "
                f"{self.lease_s:g} s) and another worker took it over"
            )


@contextmanager
def hold(ws: Workspace, name: str, *, lease_s: float, owner: str | None = None) -> Iterator[Lease]:
    """Hold the lease ``name`` for the block, renewing it every ``lease_s / 3`` seconds."""
    if lease_s <= 0:
        raise GenloopError(f"the lease must last more than 0 seconds, not {lease_s}")
    owner = owner or new_owner()
    lease = Lease(name, owner, lease_s, acquire(ws, name, owner, lease_s))
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if not renew(ws, name, owner, lease_s):
                    lease.lost.set()
                    return
            except Exception as exc:  # a catalog hiccup: try again at the next beat
                log.warning("could not renew lease %s: %s", name, exc)

    thread = threading.Thread(target=heartbeat, name=f"lease:{name}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
        if not lease.lost.is_set():
            release(ws, name, owner)


@contextmanager
def wait_for(
    ws: Workspace, name: str, *, lease_s: float, wait_s: float, busy: str | None = None
) -> Iterator[None]:
    """Hold the lease ``name`` for the block (which should end within ``lease_s``: it is
    not renewed), waiting up to ``wait_s`` seconds for it to be free; then
    :class:`LeaseBusy` (with the message ``busy``, when given)."""
    owner = new_owner()
    waited = time.monotonic()
    while True:
        try:
            acquire(ws, name, owner, lease_s)
            break
        except LeaseBusy as exc:
            if time.monotonic() - waited > wait_s:
                raise LeaseBusy(busy or str(exc)) from None
            time.sleep(random.uniform(0.02, 0.1))  # noqa: S311 (jitter, not a secret)
    try:
        yield
    finally:
        release(ws, name, owner)
