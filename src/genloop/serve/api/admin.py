"""The admin API (scope ``admin``) the web UI and scripts use: ``/v1/admin/...``.

Runs and their metric series, datasets and their versions (stats, card, sample records),
model versions and aliases (promote, roll back, diff), evaluations and their reports,
usage, alerts, feedback review, API keys, privacy export and erasure, the audit log, and
the server's own status. Every handler reads the catalog through the library functions
the CLI uses; every file it reads is found from a catalog row (an artifact key), never
from a path in the request. Identifiers in paths are checked against the same patterns
as the catalog's names, so ``..``, ``%2f`` and friends are refused before any lookup.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

import genloop
from genloop.errors import NotFoundError
from genloop.security.keys import Principal
from genloop.serve.auth import require_scope
from genloop.serve.state import get_state
from genloop.workspace.tables import (
    AliasHistory,
    ApiKey,
    AuditEvent,
    Dataset,
    DatasetVersion,
    ModelVersion,
    Run,
    RunMetric,
    Usage,
)

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # genloop.workspace.refs.NAME_RE
ALIAS = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
REF = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9][A-Za-z0-9_-]{0,63})?$"
RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MAX_ID = 2**31 - 1  # catalog ids are 32-bit on PostgreSQL: larger ones name nothing

router = APIRouter(prefix="/v1/admin", tags=["admin"])
Admin = Depends(require_scope("admin"))

# A FastAPI parameter object must not be shared between parameters (it takes the name of
# the first one), hence functions.


def name_param() -> Any:
    return Path(pattern=NAME, description="A dataset or model name.")


def version_param() -> Any:
    return Path(ge=1, le=MAX_ID, description="A version number (1, 2, …).")


def id_param() -> Any:
    return Path(ge=1, le=MAX_ID, description="An id.")


def limit_query() -> Any:
    return Query(100, ge=1, le=1000, description="Most rows returned.")


def offset_query() -> Any:
    return Query(0, ge=0, le=10_000_000, description="Rows skipped (paging).")


def _iso(d: datetime | None) -> str | None:
    return d.isoformat() if d is not None else None


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


# --------------------------------------------------------------------------- status


@router.get("/status", summary="The server: models, engines, upstreams, version")
async def status(request: Request, _: Principal = Admin) -> dict[str, Any]:
    state = get_state(request)
    models = []
    for served in state.models.served:
        cur = served.current
        entry: dict[str, Any] = {"id": served.spec, "loaded": cur is not None}
        if served.error:
            entry["error"] = served.error
        if cur is not None:
            entry |= {"ref": cur.ref, "family": cur.info.family, "kind": cur.kind}
            if cur.engine is not None:
                st = cur.engine.stats()
                entry["engine"] = {
                    "running": st.running,
                    "waiting": st.waiting,
                    "max_batch_size": st.max_batch_size,
                    "max_queue": st.max_queue,
                }
        models.append(entry)
    return {
        "version": genloop.__version__,
        "draining": state.draining or state.models.draining,
        "ready": state.models.ready,
        "models": models,
        "upstreams": state.upstreams.status(),
        "catalog": state.ws.catalog.backend,
    }


# --------------------------------------------------------------------------- runs


def _run(row: Run) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "status": row.status,
        "summary": row.summary or {},
        "dataset_version_id": row.dataset_version_id,
        "parent_model_version_id": row.parent_model_version_id,
        "parent_run_id": row.parent_run_id,
        "study": row.study,
        "trial": row.trial,
        "git_commit": row.git_commit,
        "error": row.error,
        "started_at": _iso(row.started_at),
        "ended_at": _iso(row.ended_at),
        "heartbeat_at": _iso(row.heartbeat_at),
    }


@router.get("/runs", summary="Runs, newest first", response_model=Page)
def list_runs(
    request: Request,
    _: Principal = Admin,
    kind: str | None = Query(None, max_length=32),
    status: str | None = Query(None, max_length=16),
    limit: int = limit_query(),
    offset: int = offset_query(),
) -> Page:
    query = select(Run).order_by(Run.started_at.desc(), Run.id).limit(limit).offset(offset)
    if kind is not None:
        query = query.where(Run.kind == kind)
    if status is not None:
        query = query.where(Run.status == status)
    with get_state(request).ws.catalog.session() as s:
        return Page(data=[_run(r) for r in s.scalars(query)])


@router.get("/runs/{run_id}", summary="One run with its config and metric series")
def get_run(
    request: Request,
    run_id: str = Path(pattern=RUN_ID),
    _: Principal = Admin,
    keys: str | None = Query(
        None, max_length=1000, description="Comma-separated metric keys (default: all)."
    ),
    max_points: int = Query(2000, ge=10, le=100_000, description="Points per series, at most."),
) -> dict[str, Any]:
    with get_state(request).ws.catalog.session() as s:
        row = s.get(Run, run_id)
        if row is None:
            raise NotFoundError(f"no run {run_id!r}")
        query = (
            select(RunMetric.key, RunMetric.step, RunMetric.value)
            .where(RunMetric.run_id == run_id)
            .order_by(RunMetric.key, RunMetric.step, RunMetric.id)
        )
        if keys:
            query = query.where(RunMetric.key.in_([k.strip() for k in keys.split(",")]))
        series: dict[str, list[list[float]]] = {}
        for key, step, value in s.execute(query).all():
            series.setdefault(key, []).append([step, value])
        out = _run(row) | {"config": row.config or {}}
        children = s.scalars(select(Run.id).where(Run.parent_run_id == run_id)).all()
        models = s.execute(
            select(ModelVersion.name, ModelVersion.version).where(ModelVersion.run_id == run_id)
        ).all()
        out["child_runs"] = list(children)
        out["models"] = [f"{n}@{v}" for n, v in models]
    out["metrics"] = {k: _thin(points, max_points) for k, points in series.items()}
    return out


def _thin(points: list[list[float]], limit: int) -> list[list[float]]:
    """At most ``limit`` points, evenly spaced, always keeping the last."""
    if len(points) <= limit:
        return points
    stride = len(points) / (limit - 1)
    picked = [points[int(i * stride)] for i in range(limit - 1)]
    return [*picked, points[-1]]


# --------------------------------------------------------------------------- datasets


@router.get("/datasets", summary="Datasets with their versions", response_model=Page)
def list_datasets(request: Request, _: Principal = Admin) -> Page:
    from genloop.workspace.datasets import list_dataset_versions

    versions = list_dataset_versions(get_state(request).ws)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for v in versions:
        grouped.setdefault(v.name, []).append(v.to_dict())
    return Page(
        data=[
            {"name": name, "versions": vs, "latest": vs[-1]["version"]}
            for name, vs in grouped.items()
        ]
    )


def _dataset_version(request: Request, name: str, version: int) -> Any:
    from genloop.workspace.datasets import resolve_dataset

    return resolve_dataset(get_state(request).ws, f"{name}@{version}")


@router.get("/datasets/{name}/{version}", summary="One dataset version: stats, config, lineage")
def get_dataset_version(
    request: Request, name: str = name_param(), version: int = version_param(), _: Principal = Admin
) -> dict[str, Any]:
    info = _dataset_version(request, name, version)
    ws = get_state(request).ws
    files = []
    if ws.store.exists(info.artifact):
        root = ws.store.path(info.artifact)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return dict(info.to_dict()) | {"files": files}


@router.get("/datasets/{name}/{version}/card", summary="The dataset card (Markdown)")
def get_dataset_card(
    request: Request, name: str = name_param(), version: int = version_param(), _: Principal = Admin
) -> dict[str, Any]:
    info = _dataset_version(request, name, version)
    path = get_state(request).ws.store.file(info.artifact, "card.md")
    if not path.is_file():
        raise NotFoundError(f"dataset {info.ref} has no card")
    return {"ref": info.ref, "markdown": path.read_text(encoding="utf-8")}


@router.get("/datasets/{name}/{version}/samples", summary="Sample records as stored")
def get_dataset_samples(
    request: Request,
    name: str = name_param(),
    version: int = version_param(),
    _: Principal = Admin,
    limit: int = Query(20, ge=1, le=500),
) -> dict[str, Any]:
    info = _dataset_version(request, name, version)
    path = get_state(request).ws.store.file(info.artifact, "samples.jsonl")
    records: list[Any] = []
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in islice(f, limit) if line.strip()]
    return {"ref": info.ref, "object": "list", "data": records}


# --------------------------------------------------------------------------- models


@router.get("/models", summary="Model versions with aliases and metrics", response_model=Page)
def list_model_versions(
    request: Request,
    _: Principal = Admin,
    name: str | None = Query(None, pattern=NAME),
) -> Page:
    from genloop.workspace import registry

    infos = registry.list_models(get_state(request).ws, name)
    return Page(data=[i.to_dict() for i in infos])


@router.get("/models/diff", summary="What differs between two versions")
def diff_models(
    request: Request,
    a: str = Query(pattern=REF, max_length=200, description="First ref (NAME@VERSION)."),
    b: str = Query(pattern=REF, max_length=200, description="Second ref."),
    _: Principal = Admin,
) -> dict[str, Any]:
    from genloop.workspace import registry

    return registry.diff(get_state(request).ws, a, b)


@router.get("/models/{name}/versions/{version}", summary="One model version")
def get_model_version(
    request: Request, name: str = name_param(), version: int = version_param(), _: Principal = Admin
) -> dict[str, Any]:
    from genloop.workspace import registry

    return registry.resolve(get_state(request).ws, f"{name}@{version}").to_dict()


@router.get("/models/{name}/aliases", summary="Alias history: every promotion and rollback")
def alias_history(request: Request, name: str = name_param(), _: Principal = Admin) -> Page:
    with get_state(request).ws.catalog.session() as s:
        rows = s.execute(
            select(AliasHistory, ModelVersion.version)
            .join(ModelVersion, ModelVersion.id == AliasHistory.model_version_id)
            .where(AliasHistory.name == name)
            .order_by(AliasHistory.id.desc())
        ).all()
        data = [
            {
                "alias": h.alias,
                "version": version,
                "actor": h.actor,
                "reason": h.reason,
                "at": _iso(h.at),
                "rolled_back_at": _iso(h.rolled_back_at),
            }
            for h, version in rows
        ]
    return Page(data=data)


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=MAX_ID, description="The version the alias should name.")
    alias: str = Field("production", pattern=ALIAS)
    reason: str = Field("", max_length=1000)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = Field("production", pattern=ALIAS)
    reason: str = Field("", max_length=1000)


@router.post("/models/{name}/promote", summary="Point NAME@ALIAS at a version (live swap)")
def promote(
    request: Request,
    body: PromoteRequest,
    name: str = name_param(),
    principal: Principal = Admin,
) -> dict[str, Any]:
    from genloop.workspace import registry

    info = registry.promote(
        get_state(request).ws,
        f"{name}@{body.version}",
        body.alias,
        actor=principal.actor,
        reason=body.reason,
    )
    return info.to_dict()


@router.post("/models/{name}/rollback", summary="Point NAME@ALIAS back at its previous version")
def rollback(
    request: Request,
    name: str = name_param(),
    body: RollbackRequest = Body(default_factory=RollbackRequest),  # noqa: B008
    principal: Principal = Admin,
) -> dict[str, Any]:
    from genloop.workspace import registry

    info = registry.rollback(
        get_state(request).ws, name, body.alias, actor=principal.actor, reason=body.reason
    )
    return info.to_dict()


# --------------------------------------------------------------------------- evaluations


@router.get("/evaluations", summary="Evaluations, newest first", response_model=Page)
def list_evaluations(
    request: Request,
    _: Principal = Admin,
    model: str | None = Query(None, pattern=REF, max_length=200, description="NAME@VERSION"),
    limit: int = limit_query(),
) -> Page:
    from genloop.evaluate.store import list_evaluations as _list
    from genloop.workspace import registry

    ws = get_state(request).ws
    model_id = registry.resolve(ws, model).id if model else None
    return Page(data=[r.to_dict() for r in _list(ws, model_id)[:limit]])


@router.get("/evaluations/{evaluation_id}", summary="One evaluation with its suites' results")
def get_evaluation(
    request: Request, evaluation_id: int = id_param(), _: Principal = Admin
) -> dict[str, Any]:
    from dataclasses import asdict

    from genloop.evaluate.store import get_evaluation as _get
    from genloop.evaluate.store import load_results

    ws = get_state(request).ws
    record = _get(ws, evaluation_id)
    out = record.to_dict()
    out["results"] = [asdict(r) for r in load_results(ws, record)] if record.report else []
    return out


@router.get("/evaluations/{evaluation_id}/report", summary="The evaluation report (Markdown)")
def get_evaluation_report(
    request: Request, evaluation_id: int = id_param(), _: Principal = Admin
) -> dict[str, Any]:
    from genloop.evaluate.store import REPORT_MD
    from genloop.evaluate.store import get_evaluation as _get

    ws = get_state(request).ws
    record = _get(ws, evaluation_id)
    if record.report is None:
        raise NotFoundError(f"evaluation {evaluation_id} has no report")
    path = ws.store.file(record.report, REPORT_MD)
    if not path.is_file():
        raise NotFoundError(f"evaluation {evaluation_id} has no report")
    return {"id": evaluation_id, "markdown": path.read_text(encoding="utf-8")}


# --------------------------------------------------------------------------- usage


@router.get("/usage", summary="Requests and tokens: totals by key/model, and per hour")
def usage(
    request: Request,
    _: Principal = Admin,
    hours: int = Query(24, ge=1, le=24 * 3660, description="How far back, in hours."),
    by: str = Query(
        "key,model",
        pattern=r"^(key|model|version)(,(key|model|version)){0,2}$",
        description="Group the totals by any of key, model, version.",
    ),
    model: str | None = Query(None, pattern=NAME, description="Only this model's buckets."),
) -> dict[str, Any]:
    from genloop.monitor.usage import usage_summary

    ws = get_state(request).ws
    since = datetime.now(UTC) - timedelta(hours=hours)
    summary = usage_summary(ws, timedelta(hours=hours), by=list(dict.fromkeys(by.split(","))))
    query = (
        select(Usage, ApiKey.prefix)
        .outerjoin(ApiKey, ApiKey.id == Usage.api_key_id)
        .where(Usage.hour >= since.replace(minute=0, second=0, microsecond=0))
        .order_by(Usage.hour, Usage.model_name, Usage.model_version)
    )
    if model is not None:
        query = query.where(Usage.model_name == model)
    with ws.catalog.session() as s:
        hourly = [
            {
                "hour": _iso(row.hour),
                "model": row.model_name,
                "version": row.model_version,
                "api_key_id": row.api_key_id,
                "key_prefix": prefix,
                "requests": row.requests,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
            }
            for row, prefix in s.execute(query).all()
        ]
    return {"since": since.isoformat(), "summary": summary, "hourly": hourly}


# --------------------------------------------------------------------------- monitoring


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q ≤ 100) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n·q/100)
    return sorted_values[int(rank) - 1]


@router.get("/monitoring", summary="Request rate, latency percentiles, errors and drift over time")
def monitoring(
    request: Request,
    _: Principal = Admin,
    hours: int = Query(24, ge=1, le=24 * 90, description="How far back, in hours."),
    bucket_minutes: int = Query(60, ge=1, le=24 * 60, description="Width of one bucket."),
    model: str | None = Query(None, pattern=NAME, description="Only this model's requests."),
) -> dict[str, Any]:
    """Buckets of logged requests (count, errors = status ≥ 400, latency p50/p95/p99 in ms)
    and each model's drift series (``genloop monitor drift`` scores, by check time)."""
    from genloop.monitor.drift import series as drift_series
    from genloop.workspace.tables import RequestLog

    ws = get_state(request).ws
    width = timedelta(minutes=bucket_minutes)
    now = datetime.now(UTC)
    since = now - timedelta(hours=hours)
    query = select(RequestLog.created_at, RequestLog.latency_ms, RequestLog.status).where(
        RequestLog.created_at >= since
    )
    if model is not None:
        query = query.where(RequestLog.model_name == model)
    buckets: dict[int, tuple[list[float], list[int]]] = {}
    with ws.catalog.session() as s:
        for at, latency, status in s.execute(query):
            index = int((at.astimezone(UTC) - since) / width)
            latencies, statuses = buckets.setdefault(index, ([], []))
            statuses.append(status)
            if latency is not None:
                latencies.append(float(latency))
        models = [model] if model else list(s.scalars(select(ModelVersion.name).distinct()))
    points = []
    for index in sorted(buckets):
        latencies, statuses = buckets[index]
        latencies.sort()
        points.append(
            {
                "start": (since + index * width).isoformat(),
                "requests": len(statuses),
                "errors": sum(1 for st in statuses if st >= 400),
                "latency_p50_ms": _percentile(latencies, 50),
                "latency_p95_ms": _percentile(latencies, 95),
                "latency_p99_ms": _percentile(latencies, 99),
            }
        )
    drift = {}
    for name in sorted(models):
        found = drift_series(ws, name, since=since)
        if found:
            drift[name] = {
                key: [[at.isoformat(), value] for at, value in values]
                for key, values in found.items()
            }
    return {
        "since": since.isoformat(),
        "until": now.isoformat(),
        "bucket_minutes": bucket_minutes,
        "requests": points,
        "drift": drift,
    }


# --------------------------------------------------------------------------- alerts


@router.get("/alerts", summary="Alerts, newest first", response_model=Page)
def list_alerts(
    request: Request,
    _: Principal = Admin,
    unresolved: bool = False,
    kind: str | None = Query(None, max_length=64),
    limit: int = limit_query(),
) -> Page:
    from genloop.monitor.alerts import list_alerts as _list

    alerts = _list(get_state(request).ws, kind=kind, unresolved=unresolved, limit=limit)
    return Page(data=[a.to_dict() for a in alerts])


@router.post("/alerts/{alert_id}/resolve", summary="Mark an alert resolved")
def resolve_alert(
    request: Request, alert_id: int = id_param(), _: Principal = Admin
) -> dict[str, Any]:
    from genloop.monitor.alerts import resolve_alert as _resolve

    return _resolve(get_state(request).ws, alert_id).to_dict()


# --------------------------------------------------------------------------- feedback


@router.get("/feedback", summary="Feedback rows, newest first (texts not decrypted)")
def list_feedback(
    request: Request,
    _: Principal = Admin,
    status: Literal["pending", "approved", "rejected"] | None = None,
    model: str | None = Query(None, pattern=NAME),
    user_id: str | None = Query(None, max_length=128),
    limit: int = limit_query(),
) -> dict[str, Any]:
    from genloop.feedback.store import count_feedback
    from genloop.feedback.store import list_feedback as _list

    ws = get_state(request).ws
    rows = _list(ws, status=status, model=model, user_id=user_id, limit=limit)
    return {"object": "list", "data": [r.to_dict() for r in rows], "counts": count_feedback(ws)}


@router.get("/feedback/{feedback_id}", summary="One feedback row with its texts")
def get_feedback(
    request: Request, feedback_id: int = id_param(), _: Principal = Admin
) -> dict[str, Any]:
    from genloop.feedback.store import get_feedback as _get

    state = get_state(request)
    return _get(state.ws, state.cipher, feedback_id).to_dict()


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[int] = Field(min_length=1, max_length=1000)
    decision: Literal["approved", "rejected"]


@router.post("/feedback/review", summary="Approve or reject feedback rows")
def review_feedback(
    request: Request, body: ReviewRequest, principal: Principal = Admin
) -> dict[str, Any]:
    from genloop.feedback.store import review

    ids = [i for i in body.ids if 1 <= i <= MAX_ID]
    if len(ids) != len(body.ids):
        raise NotFoundError("no feedback with such an id")
    changed = review(get_state(request).ws, ids, body.decision, actor=principal.actor)
    return {"changed": changed, "decision": body.decision}


# --------------------------------------------------------------------------- keys


@router.get("/keys", summary="API keys (never the keys themselves)", response_model=Page)
def list_keys(
    request: Request,
    _: Principal = Admin,
    user_id: str | None = Query(None, max_length=128),
) -> Page:
    from genloop.security.keys import list_keys as _list

    return Page(data=[k.to_dict() for k in _list(get_state(request).ws.catalog, user_id=user_id)])


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    scopes: list[Literal["generate", "feedback", "admin"]] = Field(min_length=1, max_length=3)
    expires_in: str | None = Field(
        None, max_length=16, description="Lifetime, e.g. 30d, 12h, 2w; unset: no expiry."
    )
    user_id: str | None = Field(None, min_length=1, max_length=128)


@router.post("/keys", summary="Create a key; the response is the only time it is shown")
def create_key(
    request: Request, body: CreateKeyRequest, principal: Principal = Admin
) -> dict[str, Any]:
    from genloop.security.keys import create_key as _create
    from genloop.security.keys import parse_duration

    expires = parse_duration(body.expires_in) if body.expires_in else None
    created = _create(
        get_state(request).ws.catalog,
        name=body.name,
        scopes=list(body.scopes),
        expires_in=expires,
        user_id=body.user_id,
        actor=principal.actor,
    )
    return created.info.to_dict() | {"key": created.plaintext}


@router.delete("/keys/{key_id}", summary="Revoke a key")
def revoke_key(
    request: Request, key_id: int = id_param(), principal: Principal = Admin
) -> dict[str, Any]:
    from genloop.security.keys import revoke_key as _revoke

    return _revoke(get_state(request).ws.catalog, key_id, actor=principal.actor).to_dict()


# --------------------------------------------------------------------------- privacy


class UserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=128, description="The user, as requests name it.")


@router.post("/privacy/export", summary="Everything held about a user (right of access)")
def privacy_export(
    request: Request, body: UserRequest, principal: Principal = Admin
) -> dict[str, Any]:
    from genloop.security.privacy import export_user

    state = get_state(request)
    return export_user(state.ws, body.user_id, state.cipher, actor=principal.actor)


@router.post("/privacy/erase", summary="Erase what is held about a user (right to erasure)")
async def privacy_erase(
    request: Request, body: UserRequest, principal: Principal = Admin
) -> dict[str, Any]:
    from starlette.concurrency import run_in_threadpool

    from genloop.security.privacy import erase_user

    state = get_state(request)
    await state.recorder.flush()  # requests answered a moment ago are erased too
    counts = await run_in_threadpool(
        erase_user, state.ws, body.user_id, principal.actor, cipher=state.cipher
    )
    return {"erased": counts}


# --------------------------------------------------------------------------- audit


@router.get("/audit", summary="The audit log: admin actions and erasures", response_model=Page)
def audit_log(
    request: Request,
    _: Principal = Admin,
    action: str | None = Query(None, max_length=64),
    limit: int = limit_query(),
    offset: int = offset_query(),
) -> Page:
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    with get_state(request).ws.catalog.session() as s:
        data = [
            {
                "id": e.id,
                "at": _iso(e.at),
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "details": e.details or {},
            }
            for e in s.scalars(query)
        ]
    return Page(data=data)


def _count(s: Any, table: Any) -> int:
    return int(s.scalar(select(func.count()).select_from(table)) or 0)


@router.get("/overview", summary="Counts for a dashboard")
def overview(request: Request, _: Principal = Admin) -> dict[str, Any]:
    with get_state(request).ws.catalog.session() as s:
        return {
            "runs": _count(s, Run),
            "datasets": _count(s, Dataset),
            "dataset_versions": _count(s, DatasetVersion),
            "model_versions": _count(s, ModelVersion),
            "keys": _count(s, ApiKey),
        }
