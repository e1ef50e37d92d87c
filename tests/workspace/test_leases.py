"""Leases in the catalog: one holder at a time, taken over when it expires."""

from __future__ import annotations

import threading
import time

import pytest

from genloop.workspace import Workspace, leases


def test_a_held_lease_is_busy_until_released_or_expired(workspace: Workspace) -> None:
    assert leases.acquire(workspace, "retrain:m", "a", lease_s=60) is False
    with pytest.raises(leases.LeaseBusy, match="held by a"):
        leases.acquire(workspace, "retrain:m", "b", lease_s=60)
    leases.release(workspace, "retrain:m", "a")
    assert leases.acquire(workspace, "retrain:m", "b", lease_s=0.05) is False
    time.sleep(0.1)
    assert leases.acquire(workspace, "retrain:m", "c", lease_s=60) is True  # taken over
    assert not leases.renew(workspace, "retrain:m", "b", lease_s=60)


def test_wait_for_waits_for_the_holder_then_gives_up(workspace: Workspace) -> None:
    name = leases.lease_name("tune", "s")
    leases.acquire(workspace, name, "other", lease_s=60)
    timer = threading.Timer(0.3, leases.release, (workspace, name, "other"))
    timer.start()
    with leases.wait_for(workspace, name, lease_s=10, wait_s=10):  # waits for "other"
        busy = leases.wait_for(workspace, name, lease_s=10, wait_s=0.2, busy="stays locked")
        with pytest.raises(leases.LeaseBusy, match="stays locked"), busy:
            pass
    timer.join()
    with leases.wait_for(workspace, name, lease_s=10, wait_s=0):  # released at the end
        pass


def test_long_keys_are_hashed_to_fit() -> None:
    assert leases.lease_name("tune", "s") == "tune:s"
    long = leases.lease_name("tune", "x" * 200)
    assert long.startswith("tune:") and len(long) == len("tune:") + 64
