"""The model registry: versions, lineage and aliases, on top of the catalog and the store.

A model version is an artifact directory ``models/<name>/<version>`` (weights, config,
``genloop.json``, ``MANIFEST.sha256``) plus a ``model_versions`` row. Aliases
(``production``, ``staging``, any name) point at versions; every promotion is kept in
``alias_history`` so ``rollback`` can step back through it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeGuard

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

import genloop
from genloop.errors import ConflictError, GenloopError, NotFoundError
from genloop.workspace import audit
from genloop.workspace.layout import GENLOOP_JSON
from genloop.workspace.refs import ModelRef, check_alias, check_name, parse_ref
from genloop.workspace.tables import (
    Alias,
    AliasHistory,
    DatasetVersion,
    ModelVersion,
    Run,
    utcnow,
)
from genloop.workspace.workspace import Workspace

FAMILIES = (
    "causal_lm",
    "seq2seq",
    "vae",
    "gan",
    "diffusion",
    "clip",
    "captioning",
    "autoencoder_kl",
    "text_to_image",
    "masked_lm",
)


@dataclass
class ModelVersionInfo:
    """A model version as the API, the CLI (``--json``) and the UI see it."""

    id: int
    name: str
    version: int
    family: str
    artifact: str
    created_at: datetime
    parent: str | None = None  # "name@version"
    run_id: str | None = None
    dataset_version_id: int | None = None
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        d["ref"] = self.ref
        return d


def _info(session: Session, row: ModelVersion) -> ModelVersionInfo:
    aliases = session.scalars(
        select(Alias.alias).where(Alias.model_version_id == row.id).order_by(Alias.alias)
    ).all()
    parent = session.get(ModelVersion, row.parent_id) if row.parent_id else None
    return ModelVersionInfo(
        id=row.id,
        name=row.name,
        version=row.version,
        family=row.family,
        artifact=row.artifact,
        created_at=row.created_at,
        parent=f"{parent.name}@{parent.version}" if parent else None,
        run_id=row.run_id,
        dataset_version_id=row.dataset_version_id,
        aliases=list(aliases),
        metrics=dict(row.metrics or {}),
        config=dict(row.config or {}),
        tags=dict(row.tags or {}),
        description=row.description,
    )


def _resolve_row(session: Session, ref: ModelRef) -> ModelVersion:
    if ref.alias is not None:
        alias = session.scalars(
            select(Alias).where(Alias.name == ref.name, Alias.alias == ref.alias)
        ).first()
        if alias is None:
            known = session.scalars(select(Alias.alias).where(Alias.name == ref.name)).all()
            hint = f" (aliases of {ref.name}: {', '.join(known)})" if known else ""
            _require_name(session, ref.name)
            raise NotFoundError(f"model {ref.name} has no alias {ref.alias!r}{hint}")
        row = session.get(ModelVersion, alias.model_version_id)
        assert row is not None  # the foreign key guarantees it
        return row
    query = select(ModelVersion).where(ModelVersion.name == ref.name)
    if ref.version is not None:
        query = query.where(ModelVersion.version == ref.version)
    else:
        query = query.order_by(ModelVersion.version.desc())
    found = session.scalars(query.limit(1)).first()
    if found is None:
        _require_name(session, ref.name)
        newest = session.scalar(
            select(func.max(ModelVersion.version)).where(ModelVersion.name == ref.name)
        )
        raise NotFoundError(f"model {ref.name} has no version {ref.version} (newest: {newest})")
    return found


def _require_name(session: Session, name: str) -> None:
    exists = session.scalar(select(ModelVersion.id).where(ModelVersion.name == name).limit(1))
    if exists is None:
        names = session.scalars(select(ModelVersion.name).distinct().order_by(ModelVersion.name))
        known = ", ".join(names.all()[:20]) or "none yet"
        raise NotFoundError(f"no model named {name!r} (models: {known})")


def _as_ref(ref: str | ModelRef) -> ModelRef:
    return parse_ref(ref) if isinstance(ref, str) else ref


def resolve(ws: Workspace, ref: str | ModelRef) -> ModelVersionInfo:
    """The version a ref names right now (aliases resolve at call time)."""
    with ws.catalog.session() as s:
        return _info(s, _resolve_row(s, _as_ref(ref)))


def artifact_path(ws: Workspace, ref: str | ModelRef) -> Path:
    """The verified artifact directory of a model version (manifest checked)."""
    return ws.store.open_verified(resolve(ws, ref).artifact)


def list_models(ws: Workspace, name: str | None = None) -> list[ModelVersionInfo]:
    with ws.catalog.session() as s:
        query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
        if name is not None:
            query = query.where(ModelVersion.name == check_name(name))
        return [_info(s, row) for row in s.scalars(query)]


def model_names(ws: Workspace) -> list[str]:
    """The names that have at least one version."""
    with ws.catalog.session() as s:
        return list(s.scalars(select(ModelVersion.name).distinct()))


def register_model(
    ws: Workspace,
    name: str,
    family: str,
    source: Path,
    *,
    run_id: str | None = None,
    dataset_version_id: int | None = None,
    parent: str | ModelRef | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    description: str = "",
    link_files: bool = False,
) -> ModelVersionInfo:
    """Copy ``source`` (a model directory) into the store as the next version of ``name``.

    ``link_files``: ``source`` is a scratch directory on the store's filesystem
    (``ws.store.scratch()``), so its files are hard-linked rather than copied again, which
    matters for a checkpoint of many gigabytes. ``source`` stays intact either way, so a
    retry after a lost race for the version number starts from the same files.
    """
    check_name(name)
    if family not in FAMILIES:
        raise GenloopError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    if not source.is_dir():
        raise NotFoundError(f"model directory {source} does not exist")
    parent_info = resolve(ws, parent) if parent is not None else None
    with ws.catalog.session() as s:  # a bad reference is a clear error, not a retry loop
        if run_id is not None and s.get(Run, run_id) is None:
            raise NotFoundError(f"no run {run_id!r} in the catalog")
        if dataset_version_id is not None and s.get(DatasetVersion, dataset_version_id) is None:
            raise NotFoundError(f"no dataset version with id {dataset_version_id}")
    taken = 0  # numbers other writers hold (published, or left by an interrupted one)
    for _attempt in range(20):  # concurrent registrations race for the next number
        with ws.catalog.session() as s:
            newest = s.scalar(
                select(func.max(ModelVersion.version)).where(ModelVersion.name == name)
            )
        version = max(newest or 0, taken) + 1
        while ws.store.exists(f"models/{name}/{version}"):  # skip without copying
            version += 1
        key = f"models/{name}/{version}"
        meta = {
            "name": name,
            "version": version,
            "family": family,
            "parent": parent_info.ref if parent_info else None,
            "run_id": run_id,
            "dataset_version_id": dataset_version_id,
            "config": config or {},
            "metrics": metrics or {},
            "tags": tags or {},
            "genloop_version": genloop.__version__,
        }
        try:
            with ws.store.writer(key) as staging:
                shutil.copytree(
                    source,
                    staging,
                    dirs_exist_ok=True,
                    symlinks=False,
                    copy_function=_link_or_copy if link_files else shutil.copy2,
                )
                (staging / "MANIFEST.sha256").unlink(missing_ok=True)
                (staging / GENLOOP_JSON).unlink(missing_ok=True)  # never write through a link
                (staging / GENLOOP_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        except ConflictError:
            taken = version  # another writer published this number first: try the next
            continue
        try:
            with ws.catalog.session() as s:
                row = ModelVersion(
                    name=name,
                    version=version,
                    family=family,
                    artifact=key,
                    parent_id=parent_info.id if parent_info else None,
                    run_id=run_id,
                    dataset_version_id=dataset_version_id,
                    config=config or {},
                    metrics=metrics or {},
                    tags=tags or {},
                    description=description,
                )
                s.add(row)
                s.flush()
                return _info(s, row)
        except DBIntegrityError:
            ws.store.delete(key)
            with ws.catalog.session() as s:
                mine = (ModelVersion.name == name, ModelVersion.version == version)
                if s.scalar(select(ModelVersion.id).where(*mine)) is None:
                    raise  # not a lost race for the number: a real error
            taken = version
    raise ConflictError(f"could not register a new version of {name}: too many concurrent writers")


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows one, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def promote(
    ws: Workspace,
    ref: str | ModelRef,
    alias: str = "production",
    *,
    actor: str = "cli",
    reason: str = "",
) -> ModelVersionInfo:
    """Point ``NAME@alias`` at the version ``ref`` names; returns that version."""
    check_alias(alias)
    try:
        with ws.catalog.session(write_lock=True) as s:
            return _promote(s, _as_ref(ref), alias, actor, reason)
    except DBIntegrityError:
        # PostgreSQL: another first promotion of this alias created its row meanwhile
        # (FOR UPDATE cannot lock a row that does not exist yet). Now it exists: retry.
        with ws.catalog.session(write_lock=True) as s:
            return _promote(s, _as_ref(ref), alias, actor, reason)


def _promote(s: Session, ref: ModelRef, alias: str, actor: str, reason: str) -> ModelVersionInfo:
    row = _resolve_row(s, ref)
    current = s.scalars(
        select(Alias).where(Alias.name == row.name, Alias.alias == alias).with_for_update()
    ).first()
    previous = current.model_version_id if current else None
    if current is None:
        s.add(Alias(name=row.name, alias=alias, model_version_id=row.id))
    else:
        current.model_version_id = row.id
        current.updated_at = utcnow()
    if previous != row.id:
        s.add(
            AliasHistory(
                name=row.name, alias=alias, model_version_id=row.id, actor=actor, reason=reason
            )
        )
    audit.record(
        s, actor, "promote", f"{row.name}@{alias}", version=row.version, previous_id=previous
    )
    s.flush()
    return _info(s, row)


def rollback(
    ws: Workspace, name: str, alias: str = "production", *, actor: str = "cli", reason: str = ""
) -> ModelVersionInfo:
    """Move ``NAME@alias`` back to the version it pointed at before the current one."""
    check_name(name)
    check_alias(alias)
    with ws.catalog.session(write_lock=True) as s:
        # Lock the alias row first, as promote() does, so the two never interleave.
        current = s.scalars(
            select(Alias).where(Alias.name == name, Alias.alias == alias).with_for_update()
        ).first()
        live = s.scalars(
            select(AliasHistory)
            .where(
                AliasHistory.name == name,
                AliasHistory.alias == alias,
                AliasHistory.rolled_back_at.is_(None),
            )
            .order_by(AliasHistory.id.desc())
            .with_for_update()
        ).all()
        if current is None or not live:
            _require_name(s, name)
            raise NotFoundError(f"model {name} has no alias {alias!r} to roll back")
        if len(live) < 2:
            raise ConflictError(
                f"{name}@{alias} has no earlier version to roll back to "
                f"(it has only ever pointed at one)"
            )
        newest, previous = live[0], live[1]
        newest.rolled_back_at = utcnow()
        current.model_version_id = previous.model_version_id
        current.updated_at = utcnow()
        row = s.get(ModelVersion, previous.model_version_id)
        assert row is not None
        audit.record(s, actor, "rollback", f"{name}@{alias}", version=row.version, reason=reason)
        s.flush()
        return _info(s, row)


def alias_history(ws: Workspace, name: str) -> list[dict[str, Any]]:
    """Every promotion and rollback of ``name``'s aliases, newest first."""
    with ws.catalog.session() as s:
        rows = s.execute(
            select(AliasHistory, ModelVersion.version)
            .join(ModelVersion, ModelVersion.id == AliasHistory.model_version_id)
            .where(AliasHistory.name == name)
            .order_by(AliasHistory.id.desc())
        ).all()
        return [
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


def _iso(d: datetime | None) -> str | None:
    return d.isoformat() if d is not None else None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def diff(ws: Workspace, a: str | ModelRef, b: str | ModelRef) -> dict[str, Any]:
    """What differs between two versions: config keys, metrics (with deltas), lineage."""
    ia, ib = resolve(ws, a), resolve(ws, b)
    ca, cb = _flatten(ia.config), _flatten(ib.config)
    config = {
        k: {"a": ca.get(k), "b": cb.get(k)}
        for k in sorted(ca.keys() | cb.keys())
        if ca.get(k) != cb.get(k)
    }
    metrics: dict[str, Any] = {}
    for k in sorted(ia.metrics.keys() | ib.metrics.keys()):
        va, vb = ia.metrics.get(k), ib.metrics.get(k)
        entry: dict[str, Any] = {"a": va, "b": vb}
        if _is_number(va) and _is_number(vb):
            entry["delta"] = vb - va
            if va:
                entry["delta_pct"] = 100.0 * (vb - va) / abs(va)
        metrics[k] = entry
    lineage = {
        k: {"a": getattr(ia, k), "b": getattr(ib, k)}
        for k in ("family", "parent", "run_id", "dataset_version_id")
        if getattr(ia, k) != getattr(ib, k)
    }
    return {"a": ia.ref, "b": ib.ref, "config": config, "metrics": metrics, "lineage": lineage}
