"""Runs in the catalog: start one, set its status, log its metric series, read them back.

A run is a ``runs`` row (kind ``train``, ``trial``, ``tune``, ``retrain``, ``pipeline``,
``monitor`` …) and its ``run_metrics`` points. Training, tuning, the pipeline and the drift
monitor all write them through these functions, so a run's life reads the same whoever
made it: ``running`` from :func:`start_run` → :func:`set_status` (``completed``,
``failed``, ``interrupted``, ``stopped`` …), ``ended_at`` set with it.
"""

from __future__ import annotations

import math
import subprocess
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from genloop.errors import NotFoundError
from genloop.workspace.tables import ModelVersion, Run, RunMetric, utcnow
from genloop.workspace.workspace import Workspace

Point = tuple[str, int, float]  # (key, step, value)


def git_commit(cwd: Path | None = None) -> str | None:
    """The current commit of the working directory's git repository, if any."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---------------------------------------------------------------------------- writing


def start_run(
    ws: Workspace,
    *,
    name: str,
    kind: str,
    config: dict[str, Any] | None = None,
    dataset_version_id: int | None = None,
    parent_model_version_id: int | None = None,
    parent_run_id: str | None = None,
    study: str | None = None,
    trial: int | None = None,
    git_commit: str | None = None,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
) -> str:
    """A new run, ``running`` (or ``failed`` and ended at once when ``error`` is given: a
    run that could not start); returns its id."""
    run_id = uuid.uuid4().hex
    now = utcnow()
    with ws.catalog.session() as s:
        s.add(
            Run(
                id=run_id,
                name=name,
                kind=kind,
                status="failed" if error else "running",
                config=config or {},
                summary=summary or {},
                dataset_version_id=dataset_version_id,
                parent_model_version_id=parent_model_version_id,
                parent_run_id=parent_run_id,
                study=study,
                trial=trial,
                git_commit=git_commit,
                error=error,
                started_at=now,
                heartbeat_at=now,
                ended_at=now if error else None,
            )
        )
    return run_id


def named_run(ws: Workspace, *, kind: str, name: str) -> str:
    """The id of the (oldest) run of ``kind`` called ``name``, started when there is none:
    a long-lived run that series are appended to (a model's ``monitor`` run)."""
    with ws.catalog.session() as s:
        found = s.scalar(
            select(Run.id).where(Run.kind == kind, Run.name == name).order_by(Run.started_at)
        )
    return found if found is not None else start_run(ws, name=name, kind=kind)


def set_status(
    ws: Workspace,
    run_id: str,
    status: str,
    *,
    summary: Mapping[str, Any] | None = None,
    error: str | None = None,
    only_if: Callable[[str], bool] | None = None,
) -> bool:
    """Set the run's status and error (``None`` clears it); ``ended_at`` is now, or unset
    while ``running``. ``summary`` is merged into the run's summary. ``only_if(status)``:
    change nothing unless the run's current status passes. False when nothing changed."""
    with ws.catalog.session() as s:
        run = s.get(Run, run_id)
        if run is None or (only_if is not None and not only_if(run.status)):
            return False
        run.status, run.error = status, error
        run.ended_at = None if status == "running" else utcnow()
        if summary is not None:
            run.summary = {**(run.summary or {}), **summary}  # a new dict: the change is seen
    return True


def update_summary(
    ws: Workspace, run_id: str, update: Callable[[dict[str, Any]], Mapping[str, Any]]
) -> None:
    """Merge ``update(summary)`` into the run's summary, in one transaction."""
    with ws.catalog.session() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}")
        summary = dict(run.summary or {})
        run.summary = {**summary, **update(summary)}


def log_metrics(ws: Workspace, run_id: str, points: Iterable[Point]) -> None:
    """Append points to the run's series (one transaction) and mark the run alive."""
    with ws.catalog.session() as s:
        s.add_all(
            RunMetric(run_id=run_id, key=key, step=step, value=value) for key, step, value in points
        )
        run = s.get(Run, run_id)
        if run is not None:
            run.heartbeat_at = utcnow()


def log_next(ws: Workspace, run_id: str, values: Mapping[str, float]) -> int:
    """Append one point per finite value at the next step (the last one + 1), timed now;
    returns that step. For series that grow by check rather than by training step."""
    now = utcnow()
    with ws.catalog.session() as s:
        last = s.scalar(select(func.max(RunMetric.step)).where(RunMetric.run_id == run_id))
        step = (last or 0) + 1
        s.add_all(
            RunMetric(run_id=run_id, key=k, step=step, value=float(v), at=now)
            for k, v in values.items()
            if math.isfinite(v)
        )
        run = s.get(Run, run_id)
        if run is not None:
            run.heartbeat_at = now
    return step


def reopen(ws: Workspace, run_id: str, *, after_step: int) -> None:
    """Mark a resumed run running again and drop the points it logged after
    ``after_step`` (its checkpoint): those steps are run, and logged, again."""
    with ws.catalog.session() as s:
        s.execute(delete(RunMetric).where(RunMetric.run_id == run_id, RunMetric.step > after_step))
        run = s.get(Run, run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}")
        run.status, run.error, run.ended_at = "running", None, None


# ---------------------------------------------------------------------------- reading


@dataclass
class RunInfo:
    id: str
    name: str
    kind: str
    status: str
    config: dict[str, Any]
    summary: dict[str, Any]
    dataset_version_id: int | None
    parent_model_version_id: int | None
    parent_run_id: str | None
    study: str | None
    trial: int | None
    git_commit: str | None
    error: str | None
    started_at: datetime
    ended_at: datetime | None
    heartbeat_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """The run as the admin API shows it (its config apart: :func:`run_details`)."""
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "summary": self.summary,
            "dataset_version_id": self.dataset_version_id,
            "parent_model_version_id": self.parent_model_version_id,
            "parent_run_id": self.parent_run_id,
            "study": self.study,
            "trial": self.trial,
            "git_commit": self.git_commit,
            "error": self.error,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "heartbeat_at": _iso(self.heartbeat_at),
        }


def _iso(d: datetime | None) -> str | None:
    return d.isoformat() if d is not None else None


def _info(row: Run) -> RunInfo:
    return RunInfo(
        id=row.id,
        name=row.name,
        kind=row.kind,
        status=row.status,
        config=dict(row.config or {}),
        summary=dict(row.summary or {}),
        dataset_version_id=row.dataset_version_id,
        parent_model_version_id=row.parent_model_version_id,
        parent_run_id=row.parent_run_id,
        study=row.study,
        trial=row.trial,
        git_commit=row.git_commit,
        error=row.error,
        started_at=row.started_at,
        ended_at=row.ended_at,
        heartbeat_at=row.heartbeat_at,
    )


def list_runs(
    ws: Workspace,
    *,
    kind: str | None = None,
    name: str | None = None,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[RunInfo]:
    """Runs, newest first."""
    query = select(Run).order_by(Run.started_at.desc(), Run.id).limit(limit).offset(offset)
    if kind is not None:
        query = query.where(Run.kind == kind)
    if name is not None:
        query = query.where(Run.name == name)
    if status is not None:
        query = query.where(Run.status == status)
    with ws.catalog.session() as s:
        return [_info(r) for r in s.scalars(query)]


def run_names(ws: Workspace, *, kind: str) -> list[str]:
    """The names of the runs of ``kind``."""
    with ws.catalog.session() as s:
        return list(s.scalars(select(Run.name).where(Run.kind == kind)))


def get_run(ws: Workspace, run_id: str) -> RunInfo:
    with ws.catalog.session() as s:
        row = s.get(Run, run_id)
        if row is None:
            raise NotFoundError(f"no run {run_id!r}")
        return _info(row)


def run_details(
    ws: Workspace,
    run_id: str,
    keys: list[str] | None = None,
    max_points: int | None = None,
    *,
    with_time: bool = False,
) -> dict[str, Any]:
    """One run with its config, child runs, the model versions it made (``NAME@VERSION``)
    and its metric series (``metrics``: key → [[step, value], …] by step; only ``keys``
    when given; at most ``max_points`` per series, evenly spaced, the last one kept).
    ``with_time`` adds each point's time as a third element, Unix seconds (UTC), so that
    runs can be compared by wall-clock time as well as by step."""
    with ws.catalog.session() as s:
        row = s.get(Run, run_id)
        if row is None:
            raise NotFoundError(f"no run {run_id!r}")
        query = (
            select(RunMetric.key, RunMetric.step, RunMetric.value, RunMetric.at)
            .where(RunMetric.run_id == run_id)
            .order_by(RunMetric.key, RunMetric.step, RunMetric.id)
        )
        if keys:
            query = query.where(RunMetric.key.in_(keys))
        series: dict[str, list[list[float]]] = {}
        for key, step, value, at in s.execute(query).all():
            point = [step, value]
            if with_time:
                point.append(round(at.astimezone(UTC).timestamp(), 3))
            series.setdefault(key, []).append(point)
        out = _info(row).to_dict() | {"config": dict(row.config or {})}
        children = s.scalars(select(Run.id).where(Run.parent_run_id == run_id)).all()
        models = s.execute(
            select(ModelVersion.name, ModelVersion.version).where(ModelVersion.run_id == run_id)
        ).all()
    out["child_runs"] = list(children)
    out["models"] = [f"{n}@{v}" for n, v in models]
    out["metrics"] = {
        k: _thin(points, max_points) if max_points else points for k, points in series.items()
    }
    return out


def _thin(points: list[list[float]], limit: int) -> list[list[float]]:
    """At most ``limit`` points, evenly spaced, always keeping the last."""
    if len(points) <= limit:
        return points
    stride = len(points) / (limit - 1)
    picked = [points[int(i * stride)] for i in range(limit - 1)]
    return [*picked, points[-1]]


def timed_series(
    ws: Workspace, *, kind: str, name: str, since: datetime | None = None
) -> dict[str, list[tuple[datetime, float]]]:
    """The series of the runs of ``kind`` called ``name`` by time: key → [(at, value)] in
    step order (points at or after ``since``)."""
    query = (
        select(RunMetric.key, RunMetric.at, RunMetric.value)
        .join(Run, Run.id == RunMetric.run_id)
        .where(Run.kind == kind, Run.name == name)
        .order_by(RunMetric.step)
    )
    if since is not None:
        query = query.where(RunMetric.at >= since)
    out: dict[str, list[tuple[datetime, float]]] = {}
    with ws.catalog.session() as s:
        for key, at, value in s.execute(query):
            out.setdefault(key, []).append((at.astimezone(UTC), value))
    return out
