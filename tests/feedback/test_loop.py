"""The retrain worker: when a retrain is due, backoff after failures, and a worker killed
mid-retrain (a real subprocess, SIGKILL) that leaves production untouched and is
recovered by the next cycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from genloop.errors import GenloopError
from genloop.feedback.loop import Worker, backoff_s, due, pending_counts, watched
from genloop.feedback.retrain import retrain
from genloop.feedback.store import submit_feedback
from genloop.security.crypto import Cipher
from genloop.workspace import Workspace, registry
from genloop.workspace.tables import Lock, Run, utcnow

CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi"]


def correct(ws: Workspace, cipher: Cipher, log: Any, model: Any, n: int, user: str = "") -> None:
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        submit_feedback(
            ws,
            cipher,
            response_id=log(model, f"Q: what colour is the sky over {city}? A:", " green."),
            rating=-1,
            correction=" blue.",
            user_id=user or f"user{i}",
        )


def test_a_retrain_is_due_at_min_items_counting_each_user_up_to_the_cap(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any
) -> None:
    model = new_model()
    ref = f"{model.name}@production"
    fb = config(feedback__min_items=5, feedback__per_user_cap=2).feedback
    correct(ws, cipher, log, model, 40, user="spammer")  # one user: counts 2
    assert pending_counts(ws, model.name, fb) == (2, 40)
    assert due(ws, ref, fb) is None
    correct(ws, cipher, log, model, 3)  # three more users: 5
    trigger = due(ws, ref, fb)
    assert trigger is not None and trigger.reason == "min_items" and trigger.new_items == 5


def test_after_a_finished_retrain_only_newer_feedback_counts(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any
) -> None:
    model = new_model()
    ref = f"{model.name}@production"
    strict = config(gate={"rules": [{"metric": "perplexity", "op": "max", "value": 1.0}]})
    correct(ws, cipher, log, model, 3)
    assert due(ws, ref, strict.feedback) is not None
    assert retrain(ws, cipher, ref, strict).outcome == "rejected"
    # the rows are still untrained, but none arrived since: not due again …
    assert pending_counts(ws, model.name, strict.feedback) == (0, 3)
    assert due(ws, ref, strict.feedback) is None
    # … unless the schedule says so
    every_hour = config(feedback__schedule="1h").feedback
    assert due(ws, ref, every_hour) is None
    later = utcnow() + timedelta(hours=2)
    trigger = due(ws, ref, every_hour, now=later)
    assert trigger is not None and trigger.reason == "schedule" and trigger.untrained == 3


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [backoff_s(n, 10, 100) for n in (1, 2, 3, 4, 50)] == [20, 40, 80, 100, 100]


def test_a_failing_model_backs_off_and_the_worker_goes_on(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any
) -> None:
    model = new_model()
    ref = f"{model.name}@production"
    correct(ws, cipher, log, model, 3)
    # a config mistake: evaluation (after the fine-tune) reads a task file that is not there
    missing = {"suites": ["code"], "tasks_path": "/nonexistent/tasks.jsonl"}
    broken = config(feedback__poll_interval_s=60.0, eval=missing)
    messages: list[str] = []
    worker = Worker(ws, cipher, broken, models=[model.name], echo=messages.append)
    assert watched(ws, [model.name]) == [ref]
    (failure,) = worker.cycle()
    assert isinstance(failure, GenloopError) and worker.failures == {ref: 1}
    assert "does not exist); failure 1 in a row, next attempt in 120 s" in messages[-1]
    assert worker.cycle() == []  # backing off: not retried yet
    assert registry.resolve(ws, ref).ref == model.ref
    worker.cfg = config(feedback__poll_interval_s=60.0)  # the config is fixed …
    worker.not_before[ref] = 0.0  # … and the wait is over
    (result,) = worker.cycle()
    assert not isinstance(result, BaseException) and result.outcome == "promoted"
    assert worker.failures == {}
    assert registry.resolve(ws, ref).parent == model.ref


@pytest.mark.integration
def test_a_worker_killed_mid_retrain_leaves_production_and_the_next_cycle_recovers(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any, yaml_config: Any
) -> None:
    model = new_model()
    ref = f"{model.name}@production"
    correct(ws, cipher, log, model, 4)
    slow = yaml_config(config(feedback__retrain={"max_steps": 100_000, "batch_size": 4}))
    env = {k: v for k, v in os.environ.items() if k != "GENLOOP_DATABASE_URL"}
    env |= {"GENLOOP_HOME": str(ws.root), "OMP_NUM_THREADS": "1"}
    args = ["loop", "--once", "--model", model.name, "--config", slow, "--lease-s", "3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "genloop", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until it is training
            with ws.catalog.session() as s:
                training = s.scalars(
                    select(Run).where(
                        Run.kind == "train", Run.name == model.name, Run.status == "running"
                    )
                ).first()
            if training is not None or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert training is not None
        time.sleep(1.0)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    assert registry.resolve(ws, ref).ref == model.ref  # production untouched
    with ws.catalog.session() as s:
        assert s.get(Lock, f"retrain:{model.name}") is not None  # left behind by the dead worker
    time.sleep(3.5)  # its lease expires

    worker = Worker(ws, cipher, config(), models=[model.name], lease_s=30)
    (result,) = worker.cycle()
    assert not isinstance(result, BaseException) and result.outcome == "promoted"
    assert registry.resolve(ws, ref).parent == model.ref
    with ws.catalog.session() as s:
        runs = s.scalars(select(Run).where(Run.name == model.name).order_by(Run.started_at)).all()
    dead = [r for r in runs if r.status == "failed"]
    assert sorted(r.kind for r in dead) == ["retrain", "train"]  # the dead worker's, closed
    assert all("abandoned" in (r.error or "") for r in dead)
    assert not [r for r in runs if r.status == "running"]
