"""``genloop loop``: the worker that retrains models as their feedback arrives.

Every ``poll_interval_s`` seconds, for each watched model (default: every model with a
``production`` alias) it decides whether a retrain is due:

    min_items   at least ``min_items`` usable feedback rows arrived since the last
                retrain that finished (each user counted up to ``per_user_cap``, so one
                user posting a thousand rows cannot trigger retrain after retrain)
    schedule    ``schedule`` (e.g. '6h') has passed since the last attempt and some
                usable feedback is still untrained

and then runs :func:`genloop.feedback.retrain.retrain` under the model's lease (one
retrain of a model at a time, whichever worker or command started it). A retrain that
raises is a failure: the model waits ``poll_interval_s · 2^failures`` (at most
``max_backoff_s``) before the next attempt; a gate that fails is not a failure (the
next attempt waits for new feedback). A retrain left unfinished by a crash is retried:
only finished ones move the "since" mark, and its lease expires after ``lease_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from sqlalchemy import select

from genloop.feedback.curate import usable_statuses, user_bucket
from genloop.feedback.export import trained_feedback_sets
from genloop.feedback.retrain import LEASE_S, RetrainResult, retrain
from genloop.feedback.store import Cipher
from genloop.workspace.leases import LeaseBusy, new_owner
from genloop.workspace.refs import parse_ref
from genloop.workspace.tables import Alias, Feedback, RequestLog, Run, utcnow
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    from genloop.config import FeedbackConfig, GenloopConfig

log = logging.getLogger(__name__)

EchoFn = Callable[[str], None]


@dataclass(frozen=True)
class Trigger:
    reason: Literal["min_items", "schedule"]
    new_items: int  # usable rows since the last finished retrain, capped per user
    untrained: int  # all usable rows no promoted retrain trained on


def last_finished(ws: Workspace, name: str) -> Run | None:
    """The newest retrain run of ``name`` that finished (promoted, rejected or skipped)."""
    with ws.catalog.session() as s:
        return s.scalars(
            select(Run)
            .where(Run.kind == "retrain", Run.name == name, Run.status == "completed")
            .order_by(Run.started_at.desc())
            .limit(1)
        ).first()


def last_attempt_at(ws: Workspace, name: str, alias: str) -> datetime | None:
    """When ``name`` was last retrained (any outcome), else when the alias last moved."""
    with ws.catalog.session() as s:
        started = s.scalar(
            select(Run.started_at)
            .where(Run.kind == "retrain", Run.name == name)
            .order_by(Run.started_at.desc())
            .limit(1)
        )
        if started is not None:
            return started
        return s.scalar(select(Alias.updated_at).where(Alias.name == name, Alias.alias == alias))


def pending_counts(ws: Workspace, name: str, fb: FeedbackConfig) -> tuple[int, int]:
    """(new rows since the last finished retrain, capped per user; all untrained rows)."""
    finished = last_finished(ws, name)
    mark = (finished.summary or {}).get("feedback_max_id", 0) if finished is not None else 0
    trained = sorted(trained_feedback_sets(ws, name))
    query = (
        select(Feedback.id, Feedback.principal, RequestLog.api_key_id)
        .join(RequestLog, Feedback.request_id == RequestLog.id)
        .where(
            RequestLog.model_name == name,
            Feedback.status.in_(usable_statuses(fb.review_required)),
        )
    )
    if trained:
        query = query.where(Feedback.exported_to.is_(None) | Feedback.exported_to.not_in(trained))
    with ws.catalog.session() as s:
        rows = s.execute(query).all()
    per_user = Counter(user_bucket(u, k) for i, u, k in rows if i > int(mark or 0))
    return sum(min(n, fb.per_user_cap) for n in per_user.values()), len(rows)


def due(ws: Workspace, ref: str, fb: FeedbackConfig, now: datetime | None = None) -> Trigger | None:
    """Whether ``ref`` (``NAME@ALIAS``) should be retrained now, and why."""
    target = parse_ref(ref)
    new, untrained = pending_counts(ws, target.name, fb)
    if new >= fb.min_items:
        return Trigger("min_items", new, untrained)
    every = fb.schedule_seconds
    if every is not None and untrained:
        last = last_attempt_at(ws, target.name, target.alias or "production")
        if last is None or ((now or utcnow()) - last).total_seconds() >= every:
            return Trigger("schedule", new, untrained)
    return None


def watched(ws: Workspace, models: Sequence[str] | None) -> list[str]:
    """The refs to watch: ``models`` (a bare NAME means NAME@production), else every
    model with a production alias."""
    if models:
        return [m if parse_ref(m).alias else f"{parse_ref(m).name}@production" for m in models]
    with ws.catalog.session() as s:
        query = select(Alias.name).where(Alias.alias == "production").order_by(Alias.name)
        names = s.scalars(query)
        return [f"{n}@production" for n in names]


def backoff_s(failures: int, poll_interval_s: float, max_backoff_s: float) -> float:
    """The wait after ``failures`` failures in a row: poll · 2^failures, capped."""
    return min(max_backoff_s, poll_interval_s * 2.0 ** min(failures, 60))


@dataclass
class Worker:
    """The loop's state: which models failed how often, and until when they wait."""

    ws: Workspace
    cipher: Cipher
    cfg: GenloopConfig
    models: Sequence[str] | None = None
    lease_s: float = LEASE_S
    echo: EchoFn = log.info
    owner: str = field(default_factory=new_owner)
    failures: dict[str, int] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)  # time.monotonic()

    def cycle(self) -> list[RetrainResult | BaseException]:
        """One pass over the watched models: retrain those that are due."""
        fb = self.cfg.feedback
        out: list[RetrainResult | BaseException] = []
        for ref in watched(self.ws, self.models):
            if time.monotonic() < self.not_before.get(ref, 0.0):
                continue
            trigger = due(self.ws, ref, fb)
            if trigger is None:
                continue
            self.echo(
                f"{ref}: retraining ({trigger.reason}: {trigger.new_items} new, "
                f"{trigger.untrained} untrained feedback rows)"
            )
            try:
                result = retrain(
                    self.ws,
                    self.cipher,
                    ref,
                    self.cfg,
                    lease_s=self.lease_s,
                    owner=self.owner,
                    actor="loop",
                )
            except LeaseBusy as exc:
                self.echo(f"{ref}: skipped, {exc}")
                continue
            except Exception as exc:
                n = self.failures[ref] = self.failures.get(ref, 0) + 1
                wait = backoff_s(n, fb.poll_interval_s, fb.max_backoff_s)
                self.not_before[ref] = time.monotonic() + wait
                self.echo(
                    f"{ref}: retrain failed ({type(exc).__name__}: {exc}); "
                    f"failure {n} in a row, next attempt in {wait:g} s"
                )
                out.append(exc)
                continue
            self.failures.pop(ref, None)
            self.echo(f"{ref}: {result.outcome}: {result.reason}")
            out.append(result)
        return out

    def run(self, stop: threading.Event | None = None, *, once: bool = False) -> None:
        """Cycle every ``poll_interval_s`` until ``stop`` is set (or once)."""
        stop = stop or threading.Event()
        while True:
            self.cycle()
            if once or stop.wait(self.cfg.feedback.poll_interval_s):
                return
